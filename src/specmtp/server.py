"""An OpenAI-compatible HTTP server over one engine: GET /v1/models, POST /v1/completions and /v1/chat/completions.

Standard library only (`http.server`). Requests are parsed and checked by `parse_request`, a pure function that
turns a JSON body into a `Request` or raises `RequestError` naming the offending field (HTTP 400, OpenAI's error
shape; an unknown model 404). One engine decodes one request at a time: concurrent requests wait on a lock, in
arrival order. A completions request with a list of prompts, or any request with n > 1, decodes as one batch (rows
that accept different numbers of drafts, as the engine batches them). `stream: true` sends server-sent events,
OpenAI's chunks and `data: [DONE]`, text as the drafts are accepted (a stop string's possible start held back until
it is known not to be one); a client that goes away stops the decoding.

Each response carries OpenAI's `usage` and, under `specmtp`, the speculative-decoding statistics of the request
(tau, drafts accepted / proposed, tokens per second).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from specmtp.engine import Engine
from specmtp.errors import SpecMTPError
from specmtp.sampling import SamplingParams

MAX_BODY = 4 * 2**20  # bytes of a request body
MAX_N = 16  # choices per request
ROLES = ("system", "user", "assistant")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the engine's reasons -> OpenAI's


class RequestError(SpecMTPError):
    """A request the server refuses: the message names the field (param) at fault."""

    def __init__(self, message: str, param: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


@dataclass(frozen=True)
class Request:
    chat: bool
    prompts: list  # completions: prompt strings; chat: one list of {"role", "content"} messages
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(f"{key} must be a number in [{lo}, {hi}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}", key)
    return value


def _messages(value) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(chat: bool, body, model: str, context: int) -> Request:
    """A /v1/completions (chat False) or /v1/chat/completions body -> Request; RequestError names what is wrong.
    model: the name this server answers to (a request may omit it); context: the model's context length."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("model") not in (None, model):
        raise RequestError(f"model {body['model']!r} is not served here (this server serves {model!r})", "model",
                           HTTPStatus.NOT_FOUND, "model_not_found")
    for key in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        if body.get(key) not in (None, False, {}, []):
            raise RequestError(f"{key} is not supported", key)
    if chat:
        prompts: list = [_messages(body.get("messages"))]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise RequestError("prompt must be a non-empty string or a non-empty list of them", "prompt")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, context if chat else 16, 1, context)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    n = _integer(body, "n", 1, 1, MAX_N)
    if stream and (n > 1 or len(prompts) > 1):
        raise RequestError("stream takes one prompt and n = 1", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    sampling = SamplingParams(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                              top_k=_integer(body, "top_k", 0, 0, 2**31 - 1),
                              top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
                              seed=_integer(body, "seed", None, -(2**63), 2**63 - 1))
    return Request(chat, prompts, max_tokens, sampling, tuple(stop), n, stream, bool(options.get("include_usage")))


class Service:
    """The engine behind a lock, and the response bodies: what the HTTP handler calls."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine, self.model = engine, model
        self.lock = threading.Lock()
        self.context = engine.target.config.max_position_embeddings
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "specmtp"}]}

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        stats = self.engine.stats
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "specmtp": {"tau": round(stats.tau, 4), "drafts_accepted": stats.accepted, "drafted": stats.drafted,
                            "tokens_per_s": round(stats.tokens_per_s, 3)}}

    def complete(self, req: Request) -> dict:
        """A whole (non-streamed) response: every prompt x n choices decoded as one batch."""
        rows = [p for p in req.prompts for _ in range(req.n)]
        with self.lock:
            outs = self.engine.generate(rows, req.max_tokens, req.sampling, req.stop, chat=req.chat)
            usage = self._usage(sum(o.prompt_tokens for o in outs[:: req.n]), sum(len(o.tokens) for o in outs))
        choices = []
        for i, o in enumerate(outs):
            choice = {"index": i, "finish_reason": FINISH[o.finish_reason], "logprobs": None}
            if req.chat:
                choice["message"] = {"role": "assistant", "content": o.text}
            else:
                choice["text"] = o.text
            choices.append(choice)
        return {"id": _id(req), "object": "chat.completion" if req.chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": choices, "usage": usage}

    def chunks(self, req: Request) -> Iterator[dict]:
        """A streamed response's chunks, as the engine accepts tokens (holding the lock until the last)."""
        rid, created = _id(req), int(time.time())
        kind = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict:
            if req.chat:
                delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": kind, "created": created, "model": self.model, "choices": [choice]}

        ids = self.engine.encode(req.prompts[0], req.chat)  # a prompt's errors before the first chunk
        with self.lock:
            pieces = self.engine.stream(ids, req.max_tokens, req.sampling, req.stop)
            try:
                if req.chat:
                    yield chunk(None, None, first=True)
                for piece in pieces:
                    yield chunk(piece, None)
                yield chunk(None, FINISH[self.engine.stats.finish_reasons[0]])
                if req.include_usage:
                    stats = self.engine.stats
                    yield {"id": rid, "object": kind, "created": created, "model": self.model, "choices": [],
                           "usage": self._usage(stats.prompt_tokens, stats.new_tokens)}
            finally:
                pieces.close()  # a client gone mid-stream: the decoding stops here


def _id(req: Request) -> str:
    return ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Handler(BaseHTTPRequestHandler):
    server_version = "specmtp"
    protocol_version = "HTTP/1.1"
    service: Service  # set by make_server on a subclass
    timeout = 120  # seconds a socket read or write may block: a stalled client cannot hold the engine for good
    quiet = False

    def log_request(self, code="-", size="-") -> None:  # errors are logged even when quiet
        if not self.quiet:
            super().log_request(code, size)

    def _send(self, status: HTTPStatus, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error",
              param: str | None = None) -> None:
        self._send(status, _error_body(message, kind, param))

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(HTTPStatus.OK, self.service.models())
        elif self.path.rstrip("/") in ("", "/health"):
            self._send(HTTPStatus.OK, {"status": "ok", "model": self.service.model})
        else:
            self._fail(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}", "not_found_error")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.rstrip("/").removeprefix("/v1")
        if path not in ("/completions", "/chat/completions"):
            self._fail(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}", "not_found_error")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self.close_connection = True
            self._fail(HTTPStatus.BAD_REQUEST if length <= MAX_BODY else HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"a request needs a JSON body of 1 to {MAX_BODY} bytes (Content-Length: "
                       f"{self.headers.get('Content-Length')})")
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._fail(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {e}")
            return
        try:
            req = parse_request(path == "/chat/completions", body, self.service.model, self.service.context)
            if req.stream:
                self._stream(req)
            else:
                self._send(HTTPStatus.OK, self.service.complete(req))
        except RequestError as e:
            self._fail(e.status, str(e), e.kind, e.param)
        except SpecMTPError as e:  # the engine's own checks (a prompt longer than the context, ...)
            self._fail(HTTPStatus.BAD_REQUEST, str(e))
        except Exception as e:  # a bug: this request fails with a one-line reason, the server goes on
            self.log_error("internal error on %s: %r", self.path, e)
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}", "server_error")

    def _stream(self, req: Request) -> None:
        chunks = self.service.chunks(req)
        first = next(chunks)  # errors (no chat template, a prompt too long) surface before the headers
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self.wfile.write(b"data: " + json.dumps(first).encode() + b"\n\n")
            for c in chunks:
                self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client is gone or stalled
            pass
        except Exception as e:  # a bug mid-stream: the headers are sent, so the error goes as the last event
            self.log_error("internal error on %s: %r", self.path, e)
            error = _error_body(f"internal error: {type(e).__name__}: {e}", "server_error")
            self.wfile.write(b"data: " + json.dumps(error).encode() + b"\n\n")
        finally:
            chunks.close()


def make_server(engine: Engine, model: str, host: str = "127.0.0.1", port: int = 8000,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: any free one) over `engine`; call serve_forever() to run it."""
    handler = type("SpecMTPHandler", (Handler,), {"service": Service(engine, model), "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
