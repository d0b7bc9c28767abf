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
})();
