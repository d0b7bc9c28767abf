// Drag-and-drop upload with a progress bar per file. Each file goes in its own request, so one
// bad file never blocks the others; the server answers with the table rows to insert, and those
// rows poll for their parse status through htmx.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const input = document.getElementById("id_files");
  const body = document.getElementById("documents-body");
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;

  function placeholder(file) {
    const row = document.createElement("tr");
    row.className = "doc-row status-uploading";
    const name = document.createElement("td");
    name.textContent = file.name;
    const status = document.createElement("td");
    status.innerHTML = '<span class="badge busy">Uploading</span>';
    const bar = document.createElement("td");
    bar.colSpan = 3;
    bar.innerHTML = '<progress class="upload-progress" max="100" value="0"></progress>';
    bar.querySelector("progress").setAttribute("aria-label", "Uploading " + file.name);
    row.append(name, status, bar);
    return row;
  }

  function upload(file) {
    const row = placeholder(file);
    const empty = document.getElementById("documents-empty");
    if (empty) empty.remove();
    body.prepend(row);
    const progress = row.querySelector("progress");
    const data = new FormData();
    data.append("files", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("X-CSRFToken", csrf);
    xhr.setRequestHeader("X-Upload", "rows");
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) progress.value = Math.round((100 * e.loaded) / e.total);
    });
    xhr.addEventListener("load", function () {
      if (xhr.status === 200 || xhr.status === 400) {
        const tmp = document.createElement("tbody");
        tmp.innerHTML = xhr.responseText;
        const rows = Array.from(tmp.children);
        row.replaceWith(...rows);
        rows.forEach(function (r) {
          // A duplicate upload returns the row that is already listed: keep just one.
          if (r.id) document.querySelectorAll("#" + r.id).forEach(function (o) { if (o !== r) o.remove(); });
          if (window.htmx) window.htmx.process(r);
        });
      } else {
        fail(row, xhr.status === 413 ? "The upload is too large." : "Upload failed (" + xhr.status + "). Try again.");
      }
    });
    xhr.addEventListener("error", function () { fail(row, "The connection was lost. Try again."); });
    xhr.send(data);
  }

  function fail(row, message) {
    row.className = "doc-row status-refused";
    row.children[1].innerHTML = '<span class="badge bad">Failed</span>';
    row.children[2].innerHTML = "";
    const p = document.createElement("p");
    p.className = "field-error";
    p.textContent = message;
    row.children[2].append(p);
  }

  function send(files) { Array.from(files).forEach(upload); }

  input.addEventListener("change", function () { send(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach(function (t) {
    form.addEventListener(t, function (e) { e.preventDefault(); form.classList.add("dragover"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    form.addEventListener(t, function (e) { e.preventDefault(); form.classList.remove("dragover"); });
  });
  form.addEventListener("drop", function (e) { if (e.dataTransfer && e.dataTransfer.files.length) send(e.dataTransfer.files); });
  form.dataset.ready = "1";  // scripted uploads are wired up (tests wait for this)
})();
