/* Mailslot's only script: small progressive enhancements. Every page works without it. */
(function () {
  "use strict";

  /* Copy buttons: rendered `hidden`, shown here, copy the text of their data-copy target. */
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "offscreen";
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      if (ok) { resolve(); } else { reject(new Error("copy failed")); }
    });
  }

  function setUpCopyButtons() {
    var live = document.createElement("p");
    live.className = "visually-hidden";
    live.setAttribute("role", "status");
    live.setAttribute("aria-live", "polite");
    document.body.appendChild(live);

    document.querySelectorAll("button[data-copy]").forEach(function (button) {
      var target = document.getElementById(button.getAttribute("data-copy"));
      if (!target) { return; }
      var label = button.textContent;
      button.hidden = false;
      button.addEventListener("click", function () {
        copyText(target.textContent).then(function () {
          button.textContent = "Copied";
          button.classList.add("copied");
          live.textContent = "Copied to the clipboard.";
        }, function () {
          var range = document.createRange();
          range.selectNodeContents(target);
          var selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          button.textContent = "Press Ctrl+C";
          live.textContent = "Selected. Press Control C to copy.";
        });
        window.setTimeout(function () {
          button.textContent = label;
          button.classList.remove("copied");
        }, 2000);
      });
    });
  }

  /* After a failed submit, move focus to the error summary so it is read out first. */
  function focusErrorSummary() {
    var summary = document.querySelector("[data-focus]");
    if (summary) { summary.focus(); }
  }

  function start() {
    setUpCopyButtons();
    focusErrorSummary();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
