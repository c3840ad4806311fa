"""A real HTTP server on 127.0.0.1 that speaks the chat completions API of Together and OpenAI, for tests.

It answers ``POST /v1/chat/completions`` (the path the `together` client uses when its
base_url is overridden, and the `openai` client's with base_url ending in /v1) and, like
vLLM, ``GET /v1/models``; given `models`, a request for any other model gets vLLM's 404.
Scripted replies (status, headers, body, delay) are served in order, then a default
responder grades by comparing the student's answer with the true answer, as a perfect judge
would. Every request is recorded, with the most in flight.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


@dataclass
class Reply:
    """One scripted HTTP response; `body` is JSON-encoded unless it is str or bytes."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def completion(text: str | None, model: str = "fake-model") -> dict[str, Any]:
    """A chat.completion body whose single choice says `text`."""
    return {
        "id": "fake-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "fake_error"}}


def _field(text: str, name: str) -> str:
    match = re.search(rf"^{name}: (.*)$", text, re.MULTILINE)
    return match.group(1).strip().lower() if match else ""


def perfect_judge(request: dict[str, Any]) -> Reply:
    """Grades (or compares) by plain string equality with the true answer."""
    user = request["messages"][-1]["content"]
    truth = _field(user, "TRUE ANSWER")
    if "ANSWER A:" in user:
        a_right = _field(user, "ANSWER A") == truth
        b_right = _field(user, "ANSWER B") == truth
        winner = "TIE" if a_right == b_right else ("A" if a_right else "B")
        return Reply(body=completion(f"WINNER: {winner}"))
    right = _field(user, "STUDENT ANSWER") == truth
    return Reply(body=completion("GRADE: CORRECT" if right else "GRADE: INCORRECT"))


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: Any
    started: float  # time.monotonic()
    finished: float = 0.0


class FakeTogetherServer:
    """Serve scripted replies, then `responder`; use as a context manager."""

    def __init__(
        self,
        script: list[Reply] | None = None,
        responder: Callable[[dict[str, Any]], Reply] = perfect_judge,
        delay_s: float = 0.0,
        models: list[str] | None = None,
    ) -> None:
        self.script = list(script or [])
        self.models = models
        self.responder = responder
        self.delay_s = delay_s
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == CHAT_PATH]

    def __enter__(self) -> FakeTogetherServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_reply(self, body: Any) -> Reply:
        model = body.get("model") if isinstance(body, dict) else None
        if self.models is not None and model not in self.models:
            message = f"The model `{model}` does not exist."  # vLLM's words
            return Reply(404, {"object": "error", "message": message, "type": "NotFoundError", "code": 404})
        with self._lock:
            if self.script:
                return self.script.pop(0)
        return self.responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == MODELS_PATH:
                    listed = [{"id": m, "object": "model"} for m in server.models or ["fake-model"]]
                    self._send(Reply(body={"object": "list", "data": listed}))
                else:
                    self._send(Reply(404, error_body(f"no route {self.path}")))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    body = None
                record = RecordedRequest(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()
                )
                with server._lock:
                    server.requests.append(record)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if self.path != CHAT_PATH:
                        reply = Reply(404, error_body(f"no route {self.path}"))
                    else:
                        reply = server._next_reply(body)
                    time.sleep(server.delay_s + reply.delay_s)
                    self._send(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout); nothing to answer
                finally:
                    record.finished = time.monotonic()
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, reply: Reply) -> None:
                if isinstance(reply.body, bytes):
                    payload, kind = reply.body, "application/octet-stream"
                elif isinstance(reply.body, str):
                    payload, kind = reply.body.encode(), "text/plain"
                else:
                    payload, kind = json.dumps(reply.body).encode(), "application/json"
                self.send_response(reply.status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler
