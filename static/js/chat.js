// Chat: send the question, then read the answer as server-sent events. Tokens are shown as
// plain text while they arrive (never parsed as HTML); the finished answer is replaced by the
// server's sanitised rendering with its numbered sources.
(function () {
  "use strict";
  const form = document.getElementById("ask-form");
  if (!form) return;
  const thread = document.getElementById("messages");
  const question = document.getElementById("id_question");
  const send = document.getElementById("send");
  const conversationField = form.querySelector("input[name=conversation]");
  const temperature = document.getElementById("id_temperature");
  const temperatureValue = document.getElementById("temperature_value");
  if (temperature && temperatureValue) {
    temperature.addEventListener("input", function () { temperatureValue.textContent = temperature.value; });
  }

  function scrollDown() { thread.scrollTop = thread.scrollHeight; }

  function placeholder() {
    const article = document.createElement("article");
    article.className = "msg msg-assistant streaming";
    const body = document.createElement("div");
    body.className = "msg-body answer";
    const text = document.createElement("p");
    text.className = "stream-text";
    const cursor = document.createElement("span");
    cursor.className = "typing";
    cursor.setAttribute("aria-label", "The model is writing");
    body.append(text, cursor);
    article.append(body);
    thread.append(article);
    scrollDown();
    return article;
  }

  function stream(url) {
    const article = placeholder();
    const text = article.querySelector(".stream-text");
    send.disabled = true;
    const source = new EventSource(url);
    source.addEventListener("token", function (e) {
      text.textContent += JSON.parse(e.data);
      scrollDown();
    });
    source.addEventListener("done", function (e) {
      source.close();
      const tmp = document.createElement("div");
      tmp.innerHTML = JSON.parse(e.data).html;
      article.replaceWith(...tmp.children);
      send.disabled = false;
      question.focus();
      scrollDown();
    });
    source.addEventListener("failure", function (e) {
      source.close();
      fail(JSON.parse(e.data).message);
    });
    function fail(message) {
      article.classList.remove("streaming");
      const cursor = article.querySelector(".typing");
      if (cursor) cursor.remove();
      const note = document.createElement("p");
      note.className = "field-error";
      note.textContent = message;
      article.append(note);
      send.disabled = false;
    }
    // A dropped connection is retried by the browser, and the server then sends the saved answer
    // whole; only a refused one (an error status) ends here.
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        fail("The answer was interrupted. Reload the page to see what was saved.");
      }
    });
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    if (!question.value.trim() || send.disabled) return;
    const data = new FormData(form);
    fetch(form.action, { method: "POST", body: data, headers: { "X-Chat": "1", "X-CSRFToken": data.get("csrfmiddlewaretoken") } })
      .then(function (r) { return r.json().then(function (body) { return { ok: r.ok, body: body }; }); })
      .then(function (r) {
        if (!r.ok) { alert(r.body.error || "The question could not be sent."); return; }
        const empty = document.getElementById("chat-empty");
        if (empty) empty.remove();
        const tmp = document.createElement("div");
        tmp.innerHTML = r.body.question_html;
        thread.append(...tmp.children);
        conversationField.value = r.body.conversation;
        history.replaceState(null, "", r.body.conversation_url);
        question.value = "";
        stream(r.body.stream_url);
      })
      .catch(function () { alert("The question could not be sent: the server did not answer."); });
  });

  question.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });

  if (form.dataset.pendingStream) stream(form.dataset.pendingStream);
  form.dataset.ready = "1";  // the form is wired up (tests wait for this)
})();
