// The portal's one script; every page works without it. It adds the copy
// button of a new app password, shows times in the browser's own time zone
// (UTC stays in each time's tooltip), and tells the server which zone an
// expiry date is meant in.
"use strict";

function pad(n) { return (n < 10 ? "0" : "") + n; }

// 2027-03-07 23:59 (UTC+05:30): the offset written out, as a zone's
// abbreviation is not known in every language and zone.
function local(when) {
  var offset = -when.getTimezoneOffset();
  var sign = offset < 0 ? "-" : "+";
  offset = Math.abs(offset);
  return when.getFullYear() + "-" + pad(when.getMonth() + 1) + "-" + pad(when.getDate()) + " " +
    pad(when.getHours()) + ":" + pad(when.getMinutes()) +
    " (UTC" + sign + pad(Math.floor(offset / 60)) + ":" + pad(offset % 60) + ")";
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("time[datetime]").forEach(function (element) {
    var when = new Date(element.getAttribute("datetime"));
    if (isNaN(when.getTime())) { return; }
    if (!element.title) { element.title = element.textContent.trim(); }
    element.textContent = local(when);
  });

  // An expiry date works to the end of that day where the user is: the
  // form says how far east of UTC that day's end is.
  document.querySelectorAll("input[data-utc-offset-of]").forEach(function (hidden) {
    var field = document.getElementById(hidden.dataset.utcOffsetOf);
    var form = hidden.form;
    if (!field || !form) { return; }
    form.addEventListener("submit", function () {
      var parts = /^(\d{4})-(\d{2})-(\d{2})$/.exec(field.value);
      hidden.value = "";
      if (!parts) { return; }
      var end = new Date(+parts[1], +parts[2] - 1, +parts[3] + 1);  // local midnight after it
      hidden.value = String(-end.getTimezoneOffset());
    });
  });

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
