"""A small OpenAI-compatible chat server for tests: a real HTTP server on 127.0.0.1 that answers
/v1/chat/completions the way a capable teacher would, deterministically and without a model.

For a pair-generation prompt (a <passage> in the message) it writes a JSON question/answer taken
from the passage: the question names the passage's first words, the answer is its first
sentence. For any other prompt it answers "Teacher says: <the question>". Passages containing a
word in `fail_words` get a 500 (the client retries, then gives up on that passage), so tests can
break a run part-way and resume it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class TeacherServer:
    url: str = ""
    requests: list[dict] = field(default_factory=list)
    fail_words: set[str] = field(default_factory=set)
    api_key: str | None = None


def _reply(body: dict) -> str:
    content = body["messages"][-1]["content"]
    passage = re.search(r"<passage>\n(.*?)\n</passage>", content, re.S)
    if passage is None:
        return f"Teacher says: {content.strip()[:200]}"
    text = " ".join(passage.group(1).split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    words = " ".join(text.split()[:6])
    return (
        "Here you go:\n```json\n"
        + json.dumps({"question": f"What about “{words}”?", "answer": first})
        + "\n```"
    )


@contextmanager
def teacher_server(**options: object) -> Iterator[TeacherServer]:
    state = TeacherServer(**options)  # type: ignore[arg-type]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._send(200, {"object": "list", "data": [{"id": "teacher-model", "object": "model"}]})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            state.requests.append(body)
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                self._send(401, {"error": {"message": "invalid api key"}})
                return
            content = body["messages"][-1]["content"]
            if any(word in content for word in state.fail_words):
                self._send(500, {"error": {"message": "teacher overloaded"}})
                return
            self._send(200, {
                "id": "x", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": _reply(body)},
                             "finish_reason": "stop"}],
            })  # fmt: skip

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
