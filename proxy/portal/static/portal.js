// The copy button of the new app password page; the page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    if (!navigator.clipboard) { return; }
    button.hidden = false;
    button.addEventListener("click", function () {
      var source = document.getElementById(button.dataset.copy);
      var status = document.getElementById("copied");
      navigator.clipboard.writeText(source.textContent.trim()).then(function () {
        status.textContent = "Copied. Paste it into the device's password field.";
      }, function () {
        status.textContent = "Could not copy: select the text and copy it by hand.";
      });
    });
  });
});
