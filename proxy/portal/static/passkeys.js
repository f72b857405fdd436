// Passkeys (WebAuthn): the form holds the server's options (data-options,
// JSON with base64url strings, as Yubico's fido2 writes them); on submit
// the browser asks the authenticator, and its answer goes back in the
// form's "response" field, as JSON with base64url strings. No inline
// script: the portal's Content-Security-Policy allows only its own files.
"use strict";

(function () {
  function bytes(text) {
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) { b64 += "="; }
    var raw = atob(b64);
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { out[i] = raw.charCodeAt(i); }
    return out.buffer;
  }

  function text(buffer) {
    if (!buffer) { return null; }
    var view = new Uint8Array(buffer);
    var raw = "";
    for (var i = 0; i < view.length; i++) { raw += String.fromCharCode(view[i]); }
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map(function (d) {
      return { type: d.type, id: bytes(d.id), transports: d.transports };
    });
  }

  function creation(options) {
    var o = options.publicKey;
    o.challenge = bytes(o.challenge);
    o.user.id = bytes(o.user.id);
    o.excludeCredentials = descriptors(o.excludeCredentials);
    return { publicKey: o };
  }

  function request(options) {
    var o = options.publicKey;
    o.challenge = bytes(o.challenge);
    o.allowCredentials = descriptors(o.allowCredentials);
    return { publicKey: o };
  }

  function answer(credential) {
    var r = credential.response;
    var response = { clientDataJSON: text(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = text(r.attestationObject);
      if (r.getTransports) { response.transports = r.getTransports(); }
    } else {
      response.authenticatorData = text(r.authenticatorData);
      response.signature = text(r.signature);
      response.userHandle = text(r.userHandle);
    }
    return JSON.stringify({
      id: credential.id, rawId: text(credential.rawId), type: credential.type,
      response: response, clientExtensionResults: credential.getClientExtensionResults(),
      authenticatorAttachment: credential.authenticatorAttachment || undefined
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("form[data-passkey]").forEach(function (form) {
      var status = form.querySelector("[data-passkey-status]");
      var field = form.querySelector("input[name=response]");
      var busy = false;
      form.addEventListener("submit", function (event) {
        if (field.value) { return; }  // the answer is in: send it
        event.preventDefault();
        if (busy) { return; }
        if (!window.PublicKeyCredential) {
          status.textContent = "This browser cannot use passkeys.";
          status.hidden = false;
          return;
        }
        if (!form.reportValidity()) { return; }
        busy = true;
        var options = JSON.parse(form.dataset.options);
        var asked = form.dataset.passkey === "create" ?
          navigator.credentials.create(creation(options)) :
          navigator.credentials.get(request(options));
        asked.then(function (credential) {
          field.value = answer(credential);
          form.submit();
        }, function (error) {
          busy = false;
          status.textContent = error && error.name === "NotAllowedError" ?
            "No passkey answered (cancelled, or the time ran out). Try again." :
            "The passkey could not be used: " + (error && error.name || "unknown error") + ".";
          status.hidden = false;
        });
      });
    });
  });
}());
