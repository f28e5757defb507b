"""The OpenAI-compatible HTTP API over a `MoskaEngine` (FastAPI; the optional `serve` extra).

Endpoints: POST /v1/completions and /v1/chat/completions (a `context` field names the shared
context a request reads, default the engine's default context; `stream: true` sends the tokens
as server-sent events, `data: {chunk}` lines closed by `data: [DONE]`; an event carries every
token that arrived since the last one; `stream_options: {"include_usage": true}` adds a last
chunk with the usage), GET /v1/models and /v1/models/{id} (the model and its resident contexts),
/health, /metrics (Prometheus text).

Every request is submitted to the engine's background loop (`MoskaEngine.start`) and joins the
running batch at its next step; a client that disconnects cancels its request, whose slot and
pages come back before the next step. Errors are OpenAI-shaped JSON, `{"error": {"message",
"type", "param", "code"}}`: 400 malformed JSON or a bad field (code "context_length_exceeded": a
prompt over the per-request token budget), 404 an unknown model, context or route, 429 too many
requests waiting, 409 a request the server cancelled (its context was unloaded or
replaced), 503 the engine does not run (an engine process that died:
`moska_jax.serve_core.EngineProcess`); an internal failure is a 500 with a message and never a
traceback. Not implemented (400 when asked for): n > 1, best_of, echo, logprobs, stop strings,
suffix, penalties, logit_bias, tools, JSON response formats, and the sampling extras of
vLLM-style servers (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos).

The engine is a `MoskaEngine` stepping on a thread of this process, or an `EngineProcess`
stepping in a process of its own (no GIL shared with the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from moska_jax.config import check_int
from moska_jax.engine import MoskaEngine
from moska_jax.sampling import SEED_RANGE, Sampling
from moska_jax.scheduler import FINISH_REASONS
from moska_jax.serve_core import EngineProcess

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
# Fields of the OpenAI API (and the sampling extras OpenAI clients pass to vLLM-style servers)
# this server does not implement, with the values that ask for nothing: anything else is a 400,
# never silently ignored. A value matches only with its own type (logprobs 0 asks for logprobs).
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False),
               "logprobs": (None, False), "top_logprobs": (None, 0), "stop": (None, [], ""),
               "suffix": (None,), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
               "response_format": (None, {"type": "text"}), "top_k": (None, -1, 0),
               "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
               "stop_token_ids": (None, []), "ignore_eos": (None, False)}


class ApiError(Exception):
  """An error answered as OpenAI-shaped JSON with `status`."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  """An OpenAI-shaped error: the body of an error response, or a stream's error event."""
  return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                    "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
  return JSONResponse(status_code=status, content=error_body(status, message, param, code))


class _Detokenizer:
  """Text deltas of a growing token list, so that they concatenate to the final text.

  Each call decodes a short window, not the whole list: the tokens of the previous delta and
  those since, and cuts the former's text off (both decodes start at the same token, so a
  tokenizer that decodes the first token of a text differently, e.g. without its leading space,
  does so in both). A delta whose text ends in an incomplete character (U+FFFD, a partial UTF-8
  sequence) is held back until the character completes or the request ends.
  """

  def __init__(self, engine: MoskaEngine | EngineProcess):
    self.decode, self.tokens = engine.decode, []
    self.prefix = self.sent = 0  # window start; end of the tokens sent (tokens[:sent])

  def add(self, tokens: list[int]) -> str:
    self.tokens += tokens
    return self._delta(final=False)

  def flush(self) -> str:
    return self._delta(final=True)

  def _delta(self, final: bool) -> str:
    if self.sent == len(self.tokens):
      return ""
    text = self.decode(self.tokens[self.prefix:])
    if not final and text.endswith("\ufffd"):
      return ""
    head = len(self.decode(self.tokens[self.prefix:self.sent]))
    self.prefix, self.sent = self.sent, len(self.tokens)
    return text[head:]


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      low <= value <= high):  # also NaN; an int too large for a float compares exactly
    raise ApiError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", param=name)
  return float(value)


class Server:
  """The API's state: the engine, the served model's name, the waiting limit, HTTP counters."""

  def __init__(self, engine: MoskaEngine | EngineProcess, model_name: str, max_waiting: int,
               eos_id: int | None, stream_interval: int):
    if engine.decode([0]) is None:
      raise ValueError("serve: the engine's tokenizer must decode (text responses)")
    self.engine, self.model_name, self.max_waiting, self.eos_id = (engine, model_name,
                                                                   max_waiting, eos_id)
    self.stream_interval = stream_interval
    self.created = int(time.time())
    self.http = {}  # (path, status) -> count

  # ---- parsing --------------------------------------------------------------------------------

  async def body(self, request: HttpRequest) -> dict:
    raw = await request.body()
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
      raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    self.check_model(body.get("model"))
    for name, allowed in UNSUPPORTED.items():
      if name in body and not any(type(body[name]) is type(a) and body[name] == a
                                  for a in allowed):
        raise ApiError(400, f"{name}={body[name]!r} is not supported by this server",
                       param=name)
    return body

  def check_model(self, model: str | None) -> None:
    """Raises the 404 of a model id other than the served one (None: the served one)."""
    if model is not None and model != self.model_name:
      raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                     f"{self.model_name!r}", param="model", code="model_not_found")

  def submit_args(self, body: dict, prompt: str | list[int],
                  default_max_tokens: int | None) -> dict:
    """Validates the common fields; returns the engine's submit arguments. Without max_tokens
    a request generates default_max_tokens, or (None) up to the per-request budget, as the
    OpenAI API's completions (16) and chat completions (the context) do."""
    field = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = body.get(field)  # null counts as absent, as in the OpenAI API
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
      raise ApiError(400, f"{field} must be an integer >= 1, got {max_tokens!r}", param=field)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < SEED_RANGE):
      raise ApiError(400, f"seed must be an integer in [0, 2**32), got {seed!r}", param="seed")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    sampling = Sampling(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                        top_p=max(top_p, 1e-9), seed=seed)  # top_p 0: the top token only
    context = body.get("context")
    engine = self.engine
    if context is not None and not isinstance(context, str):
      raise ApiError(400, f"context must be a string, got {context!r}", param="context")
    if context is not None and context not in engine.contexts:
      raise ApiError(404, f"unknown context {context!r}; resident contexts: "
                     f"{sorted(engine.contexts)}", param="context", code="context_not_found")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
      raise ApiError(400, "stream must be true or false", param="stream")
    try:
      tokens = engine.encode(prompt)
    except ValueError as e:
      raise ApiError(400, str(e), param="prompt") from None
    limit = engine._request_limit()
    if max_tokens is None:
      max_tokens = max(1, limit - len(tokens)) if default_max_tokens is None else (
          default_max_tokens)
    if len(tokens) + max_tokens > limit:
      raise ApiError(400, f"the prompt ({len(tokens)} tokens) plus max_tokens ({max_tokens}) "
                     f"exceeds this server's per-request budget of {limit} tokens",
                     param="prompt", code="context_length_exceeded")
    if engine.queue_length >= self.max_waiting:
      raise ApiError(429, f"{engine.queue_length} requests are waiting (the limit is "
                     f"{self.max_waiting}); retry later", code="rate_limit_exceeded")
    return dict(prompt=tokens, max_new_tokens=max_tokens, sampling=sampling,
                eos_id=self.eos_id, context=context)

  # ---- running --------------------------------------------------------------------------------

  async def complete(self, request: HttpRequest, args: dict):
    """Runs one request to its end; None when the client left (the request is cancelled)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_event(r, token):
      if token is None:
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    r = self._submit(args, on_event)
    try:
      while not done.done():
        await asyncio.wait([done], timeout=0.1)
        if not done.done() and await request.is_disconnected():
          self.engine.cancel(r)
          return None
    except asyncio.CancelledError:
      self.engine.cancel(r)
      raise
    if r.finish_reason == "cancelled":  # by the server: its context was unloaded or replaced
      raise ApiError(409, f"the request was cancelled: {r.error}", code="request_cancelled")
    if r.finish_reason not in ("stop", "length"):
      raise ApiError(500 if self.engine.running else 503,
                     f"the request ended with {r.finish_reason}: {r.error}")
    return r

  def _submit(self, args: dict, on_event=None):
    try:
      return self.engine.submit(**args, on_event=on_event)
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    except RuntimeError as e:  # the engine does not run
      raise ApiError(503, str(e)) from None

  def stream(self, args: dict, chunk, include_usage: bool = False) -> StreamingResponse:
    """The request's tokens as server-sent events; chunk(text, finish_reason) -> JSON dict; with
    include_usage a last chunk with no choices carries the usage (OpenAI's stream_options)."""
    try:
      tokens = self.engine.stream(**args, stream_interval=self.stream_interval)
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    except RuntimeError as e:  # the engine does not run
      raise ApiError(503, str(e)) from None

    # A text event is the chunk's JSON with the text put in: one json.dumps of a short string
    # per event, not of the whole chunk.
    marker = "\0text\0"
    head, tail = _sse(chunk(marker, None)).split(json.dumps(marker))

    async def events():
      detok = _Detokenizer(self.engine)
      async with tokens:
        yield _sse(chunk(None, None))  # the first event: a role / empty text
        try:
          async for token in tokens:
            # The tokens that arrived meanwhile too (one event, one write for all of them).
            # the end-of-sequence token ends the text; it is not part of it
            delta = detok.add([t for t in (token, *tokens.drain()) if t != self.eos_id])
            if delta:
              yield f"{head}{json.dumps(delta)}{tail}"
        except RuntimeError as e:
          yield _sse(error_body(500, str(e)))
          return
        if tokens.request.finish_reason == "cancelled":  # by the server, not by this client
          yield _sse(error_body(409, f"the request was cancelled: {tokens.request.error}",
                                code="request_cancelled"))
          return
        last = _sse(chunk(detok.flush(), tokens.request.finish_reason))
        if include_usage:
          last += _sse(chunk(None, None) | {"choices": [], "usage": self.usage(tokens.request)})
        yield last + "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

  async def answer(self, request: HttpRequest, body: dict, args: dict, chunk, final):
    """The response to a completion request: an SSE stream of chunk(text, finish_reason) when
    body asks for one, else final(request) once it ended."""
    if body.get("stream"):
      options = body.get("stream_options") or {}
      if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
      return self.stream(args, chunk, include_usage=options.get("include_usage") is True)
    r = await self.complete(request, args)
    if r is None:
      return error_response(400, "the client disconnected")
    return final(r)

  def text(self, r) -> str:
    """The request's text: its tokens without the end-of-sequence token that ended it."""
    ends = r.finish_reason == "stop" and r.tokens and r.tokens[-1] == self.eos_id
    return self.engine.decode(r.tokens[:-1] if ends else r.tokens)

  def usage(self, r) -> dict:
    return dict(prompt_tokens=len(r.prompt), completion_tokens=len(r.tokens),
                total_tokens=len(r.prompt) + len(r.tokens))

  # ---- metrics --------------------------------------------------------------------------------

  def metrics(self) -> str:
    e = self.engine
    s = e.stats
    lines = []

    def metric(name, kind, help_, samples):
      lines.append(f"# HELP moska_{name} {help_}")
      lines.append(f"# TYPE moska_{name} {kind}")
      for labels, value in samples:
        lines.append(f"moska_{name}{labels} {value}")

    metric("requests_total", "counter", "Requests finished, by finish reason.",
           [(f'{{reason="{r}"}}', s[f"requests_{r}"]) for r in FINISH_REASONS])
    metric("http_requests_total", "counter", "HTTP requests answered, by path and status.",
           [(f'{{path="{p}",status="{c}"}}', n) for (p, c), n in sorted(self.http.items())])
    metric("generated_tokens_total", "counter", "Tokens sampled.", [("", s["tokens"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.",
           [("", s["prefill_tokens"])])
    metric("steps_total", "counter", "Engine steps, by kind.",
           [('{kind="decode"}', s["steps_decode"]), ('{kind="mixed"}', s["steps_prefill"])])
    metric("step_seconds_total", "counter", "Seconds spent in steps.", [("", s["seconds"])])
    metric("step_seconds", "gauge", "Wall time of the latest step.",
           [("", e.last_step_seconds)])
    metric("tokens_per_second", "gauge", "Sampled tokens per second of stepping.",
           [("", s["tokens"] / s["seconds"] if s["seconds"] else 0.0)])
    metric("queue_length", "gauge", "Requests waiting for a slot.", [("", e.queue_length)])
    metric("active_requests", "gauge", "Requests holding a slot.", [("", e.active_requests)])
    metric("batch_occupancy", "gauge", "Fraction of the batch's slots in use.",
           [("", e.active_requests / e.max_batch)])
    metric("contexts", "gauge", "Resident shared contexts.", [("", len(e.contexts))])
    return "\n".join(lines) + "\n"


class _CountResponses:
  """Counts the responses by (route, status) into `counts`: the route's path template
  ("/v1/models/{model_id}"), or "unmatched" for a path no route serves, so that clients cannot
  grow the metrics without bound by asking for new paths. A plain ASGI middleware: Starlette's
  `BaseHTTPMiddleware` (`@app.middleware`) would pass every chunk of a stream through a task and
  a memory stream of its own."""

  def __init__(self, app, counts: dict):
    self.app, self.counts = app, counts

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def counted(message):
      if message["type"] == "http.response.start":
        route = scope.get("route")  # set by the router on the scope it was given
        key = (getattr(route, "path", "unmatched"), message["status"])
        self.counts[key] = self.counts.get(key, 0) + 1
      await send(message)

    await self.app(scope, receive, counted)


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"


def _chat_prompt(body: dict) -> str:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "messages must be a non-empty list", param="messages")
  lines = []
  for i, m in enumerate(messages):
    content = m.get("content") if isinstance(m, dict) else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
      content = "".join(p["text"] for p in content)  # the text parts of a content list
    role = m.get("role") if isinstance(m, dict) else None
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
      raise ApiError(400, f"messages[{i}] must be an object with a role (system, developer, "
                     f"user, assistant) and a content: a string or a list of text parts",
                     param="messages")
    lines.append(f"{role}: {content}\n")
  return "".join(lines) + "assistant:"


def _completion_prompt(body: dict) -> str | list[int]:
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
      isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
    return prompt
  raise ApiError(400, "prompt must be one string or one list of token ids (one prompt per "
                 "request)", param="prompt")


def create_app(engine: MoskaEngine | EngineProcess, *, model_name: str = "moska",
               max_waiting: int = 256, eos_id: int | None = None,
               switch_interval: float | None = 2e-4, stream_interval: int = 1) -> FastAPI:
  """The FastAPI app serving `engine` as `model_name`; on startup it compiles the engine's steps
  (`MoskaEngine.warmup`) and starts its loop, on shutdown it stops the loop.

  Args:
    engine: the engine, a `MoskaEngine` or an `EngineProcess` (its tokenizer must decode).
    model_name: the model id the API reports and accepts.
    max_waiting: requests submitted and not yet admitted to a slot (`queue_length`, which
      counts a request until the next step admits it, even while slots are free) before new
      ones get 429.
    eos_id: the token that ends a request (counted in its usage, not part of its text), or None.
    switch_interval: the interpreter's thread switch interval while the app runs
      (`MoskaEngine.start`), or None to leave it.
    stream_interval: tokens per server-sent event of a stream while it keeps up (the last event
      carries the rest; `MoskaEngine.stream`): 1 sends every token as it comes; larger values
      cut the server's per-token work for many concurrent streams.

  Raises:
    ValueError: switch_interval not None and not > 0; stream_interval or max_waiting not an int
      >= 1; eos_id not None nor a token id of the engine's model.
  """
  if switch_interval is not None and not switch_interval > 0:  # before the app starts
    raise ValueError(f"create_app: switch_interval must be > 0 seconds or None, got "
                     f"{switch_interval!r}")
  check_int(stream_interval, "stream_interval", "create_app")
  check_int(max_waiting, "max_waiting", "create_app")  # a server's setting, not a client's 429
  if eos_id is not None:
    engine.model_config.check_tokens([eos_id], "create_app: eos_id")
  server = Server(engine, model_name, max_waiting, eos_id, stream_interval)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine.warmup()  # compile every step shape before the first request
    engine.start(switch_interval)
    try:
      yield
    finally:
      engine.stop()

  app = FastAPI(title="moska-jax", lifespan=lifespan)
  app.state.server = server

  app.add_middleware(_CountResponses, counts=server.http)

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    return error_response(e.status, e.message, e.param, e.code)

  @app.exception_handler(RequestValidationError)
  async def invalid(request, e):
    return error_response(400, f"invalid request: {e.errors()}")

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):
    return error_response(e.status_code, str(e.detail))

  @app.exception_handler(Exception)
  async def internal(request, e: Exception):
    log.exception("internal error answering %s", request.url.path)
    return error_response(500, f"internal server error ({type(e).__name__})")

  async def begin(request: HttpRequest, prompt_of, kind: str, default_max_tokens: int | None):
    """A completion request's body, submit arguments, id ("{kind}-...") and creation time."""
    body = await server.body(request)
    args = server.submit_args(body, prompt_of(body), default_max_tokens)
    return body, args, f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())

  @app.post("/v1/completions")
  async def completions(request: HttpRequest):
    body, args, cid, created = await begin(request, _completion_prompt, "cmpl", 16)

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
      return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
              "choices": [{"text": text or "", "index": 0, "logprobs": None,
                           "finish_reason": finish}]}

    def final(r) -> dict[str, Any]:
      return chunk(server.text(r), r.finish_reason) | {"usage": server.usage(r)}

    return await server.answer(request, body, args, chunk, final)

  @app.post("/v1/chat/completions")
  async def chat(request: HttpRequest):
    body, args, cid, created = await begin(request, _chat_prompt, "chatcmpl", None)

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
      delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
          {"content": text} if text else {})
      return {"id": cid, "object": "chat.completion.chunk", "created": created,
              "model": model_name,
              "choices": [{"index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": finish}]}

    def final(r) -> dict[str, Any]:
      return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
              "choices": [{"index": 0, "message": {"role": "assistant",
                                                    "content": server.text(r)},
                           "logprobs": None, "finish_reason": r.finish_reason}],
              "usage": server.usage(r)}

    return await server.answer(request, body, args, chunk, final)

  def model_card() -> dict[str, Any]:
    contexts = [{"id": name, "tokens": engine.context_tokens(name),
                 "default": name == engine.default_context} for name in engine.contexts]
    return {"id": model_name, "object": "model", "created": server.created,
            "owned_by": "moska-jax", "contexts": contexts}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{model_id}")
  async def model(model_id: str):
    server.check_model(model_id)
    return model_card()

  @app.get("/health")
  async def health():
    # 503 once the loop (or the engine's process) stopped: probes that read only the status
    # code stop sending traffic here.
    return JSONResponse(status_code=200 if engine.running else 503, content={
        "status": "ok" if engine.running else "stopped", "model": model_name,
        "contexts": list(engine.contexts)})

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

  return app
