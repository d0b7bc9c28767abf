// Small behaviours every page may use, declared in the markup with data attributes. They live here,
// not in onclick/onsubmit attributes, because the Content-Security-Policy runs no inline script.
// Listeners sit on the document, so content that htmx swaps in later works too.
(function () {
  "use strict";

  // <form data-confirm="Delete this?">: ask before submitting; Cancel keeps the page as it is.
  document.addEventListener("submit", function (e) {
    const form = e.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      e.preventDefault();
    }
  });

  // <button data-print>: the browser's print dialog (which also saves as PDF).
  document.addEventListener("click", function (e) {
    const button = e.target instanceof Element ? e.target.closest("[data-print]") : null;
    if (button) window.print();
  });

  // <div hx-trigger="every 5s, slm-visible from:document" data-poll-visible>: a poll that waits
  // while the tab is hidden (nobody looks, so the server is spared) and refreshes at once when
  // it is shown again.
  document.addEventListener("htmx:beforeRequest", function (e) {
    const elt = e.detail && e.detail.elt;
    if (document.hidden && elt instanceof Element && elt.hasAttribute("data-poll-visible")) e.preventDefault();
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) document.dispatchEvent(new Event("slm-visible"));
  });
})();
