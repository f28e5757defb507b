"""The engine in a process of its own: `EngineProcess`, a `MoskaEngine`'s serving surface over a
pipe to an engine-core process.

A server whose event loop and stepping thread share one process share one GIL: with many
streams the loop's per-event work delays every step. vLLM V1 (its engine core) and SGLang (its
scheduler process) step in a process of their own; so does `EngineProcess`. The front end (the
HTTP process) keeps the tokenizer, the requests' token lists and the streams; the core, a child
started with the "spawn" method (a process that initialized JAX is never forked), builds the
engine with `factory(**kwargs)` and runs its steps on its main thread, reading commands between
steps. One message a step carries every request's new tokens back; a reader thread of the front
end takes it and hands the streams' tokens to each asyncio loop in one call_soon_threadsafe, as
the in-process engine does. Commands go out through a sender thread, so a caller (the HTTP
event loop) never blocks on a full pipe while the core runs a loader or a warmup.

Protocol (a duplex `multiprocessing.Pipe`, pickled tuples; rid: the front end's request id):
  front end -> core:
    ("submit", rid, tokens, max_new_tokens, sampling, eos_id, context)
    ("cancel", rid)
    ("warmup", call)  compiles every step shape (`MoskaEngine.warmup`)
    ("load_context", call, name, loader)  `MoskaEngine.load_context(name, loader(engine))` (the
                    loader pickled on its own, so a loader the core cannot rebuild is an error too)
    ("unload_context", call, name)        `MoskaEngine.unload_context(name)`
                    each of these three answered by ("done", call, contexts, error): the call's
                    number, the resident contexts {name: S} after it, and the ValueError's
                    message or None
    ("stop",)       the core exits (it does too when the pipe closes: the front end died)
  core -> front end:
    ("ready", info) once the engine is built: {"contexts": {name: S}, "default_context",
                    "request_limit", "max_batch", "model_config"}
    ("step", tokens, ends, status) after each step that did anything: tokens [(rid, token)] in
                    order, ends [(rid, finish_reason, error)] (a submission the engine refused
                    ends as "error" with its message), status {"stats", "last_step_seconds",
                    "queue_length", "active_requests", "free_pages", "compilations"}
    ("failed", message)  the engine could not be built (the core exits)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moska_jax.config import check_int
from moska_jax.engine import (ByteTokenizer, MoskaEngine, TokenStream, check_sampling, hand_over,
                              over_budget, unknown_context)
from moska_jax.sampling import Sampling
from moska_jax.scheduler import Request

__all__ = ["EngineProcess"]

log = logging.getLogger(__name__)


class EngineProcess:
  """A `MoskaEngine` stepping in a child process, with the surface the HTTP API uses of one
  (`moska_jax.serve_api.create_app` takes either): submit, stream, cancel, encode, decode,
  contexts, context_tokens, default_context, queue_length, active_requests, stats, warmup,
  start, stop, running; and load_context / unload_context, whose stores are made in the core.

  The core starts stepping as soon as it is built (`start` only checks it still runs); `stop`
  ends it for good. If the core dies, its open requests end with "error" and new ones raise
  RuntimeError (the HTTP API answers 503). `stats`, `queue_length`, `active_requests`,
  `free_pages` and `last_step_seconds` mirror the core's as of its latest step message;
  `queue_length` also counts requests submitted since.

  Args:
    factory: a picklable callable (a module-level function) that builds the engine in the
      child, e.g. `moska_jax.serve_setup.build_engine`.
    kwargs: its keyword arguments (picklable).
    tokenizer: the front end's encode / decode pair, the same as the engine's (default: UTF-8
      bytes); the core never sees text.
    env: environment variables set in the child before it builds the engine (e.g.
      XLA_PYTHON_CLIENT_MEM_FRACTION when another process holds the same accelerator).
    timeout: seconds to wait for the engine to be built (None: as long as the core lives).

  Raises:
    RuntimeError: the core failed to build the engine or exited (its message or exit code).
  """

  # The in-process engine's front-end half, unchanged: they use only _encode, _decode,
  # model_config, running, submit and _events.
  encode = MoskaEngine.encode
  decode = MoskaEngine.decode

  def __init__(self, factory: Callable[..., MoskaEngine], kwargs: Mapping | None = None, *,
               tokenizer=None, env: Mapping[str, str] | None = None,
               timeout: float | None = None):
    tokenizer = tokenizer or ByteTokenizer()
    self._encode, self._decode = tokenizer.encode, getattr(tokenizer, "decode", None)
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_core_main, name="moska-engine-core",
                                args=(child, factory, dict(kwargs or {}), dict(env or {})),
                                daemon=True)
    self._process.start()
    child.close()  # the core's end lives in the core: its exit closes the pipe here
    kind, info = self._recv_first(timeout)
    if kind == "failed":
      self._process.join(30)
      self._conn.close()
      raise RuntimeError(f"EngineProcess: the core failed to build the engine:\n{info}")
    self._contexts: dict[str, int] = info["contexts"]
    self.default_context: str = info["default_context"]
    self.max_batch: int = info["max_batch"]
    self.model_config = info["model_config"]
    self._limit: int = info["request_limit"]
    self.stats: dict = collections.Counter()
    self.last_step_seconds, self.active_requests, self.free_pages = 0.0, 0, 0
    self._core_queue, self._compilations = 0, 0
    self._open: dict[int, Request] = {}  # rid -> the front end's mirror of a running request
    self._ids = itertools.count()
    self._send_lock = threading.Lock()  # submit / cancel may come from several threads
    self._events: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
    # Calls answered by "done", by number: the answer to a call whose caller stopped waiting
    # (interrupted) finds its own future, never the next call's.
    self._calls: dict[int, concurrent.futures.Future] = {}
    self._call_ids = itertools.count()
    self._error: str | None = None  # why the core is gone (None while it runs)
    self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # pickled commands; None: stop
    self._sender = threading.Thread(target=self._send_loop, name="moska-engine-sender",
                                    daemon=True)
    self._reader = threading.Thread(target=self._read, name="moska-engine-reader", daemon=True)
    self._sender.start()
    self._reader.start()

  def _recv_first(self, timeout: float | None) -> tuple:
    """The core's first message ("ready" or "failed")."""
    try:
      if not self._conn.poll(timeout):
        self._process.kill()
        raise RuntimeError(f"EngineProcess: the engine was not built within {timeout} s")
      return self._conn.recv()
    except (EOFError, OSError):
      self._process.join(30)
      raise RuntimeError(f"EngineProcess: the core exited (code {self._process.exitcode}) "
                         f"before the engine was built") from None
    finally:
      if self._process.exitcode is not None:
        self._conn.close()

  # ---- the engine's surface -------------------------------------------------------------------

  @property
  def contexts(self) -> tuple[str, ...]:
    return tuple(self._contexts)

  def context_tokens(self, name: str) -> int:
    return self._contexts[name]

  def _request_limit(self) -> int:
    return self._limit

  def compilations(self) -> int:
    return self._compilations

  @property
  def running(self) -> bool:
    return self._error is None

  @property
  def queue_length(self) -> int:
    """The core's queue at its latest step, plus the requests submitted since."""
    return max(self._core_queue, len(self._open) - self.active_requests)

  def submit(self, prompt: str | Sequence[int], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, eos_id: int | None = None,
             context: str | None = None,
             on_event: Callable[[Request, int | None], None] | None = None) -> Request:
    """`MoskaEngine.submit` through the core: the returned `Request` mirrors the core's
    (tokens, finish_reason, error, finished_event); on_event runs on the reader thread.

    Raises:
      ValueError: a bad prompt, max_new_tokens, sampling, eos_id or context, or a request over
        the budget.
      RuntimeError: the core is gone.
    """
    tokens = self.encode(prompt)
    check_int(max_new_tokens, "max_new_tokens", "request")
    check_sampling(self.model_config, sampling, eos_id)
    if len(tokens) + max_new_tokens > self._limit:
      raise over_budget("request", len(tokens), max_new_tokens, self._limit)
    context = self.default_context if context is None else context
    if context not in self._contexts:
      raise unknown_context(context, self._contexts)
    sampling = sampling.seeded()  # drawn here, so that this side's Request keeps it too
    r = Request(id=next(self._ids), prompt=tokens, max_new=max_new_tokens, eos_id=eos_id,
                context=context, sampling=sampling, on_event=on_event)
    self._send(("submit", r.id, tokens, max_new_tokens, sampling, eos_id, context), opens=r)
    return r

  def stream(self, *args, **kwargs) -> TokenStream:
    """`MoskaEngine.stream` through the core.

    Raises:
      RuntimeError: the core is gone; ValueError: as for `submit`.
    """
    self.start()
    return MoskaEngine.stream(self, *args, **kwargs)

  def cancel(self, request: Request) -> None:
    """Ends `request` in the core ("cancelled"); a finished one is left as it is."""
    if not request.done and self.running:
      with contextlib.suppress(RuntimeError):  # a core gone meanwhile ended it already
        self._send(("cancel", request.id))

  def warmup(self) -> None:
    """Compiles every step shape in the core (`MoskaEngine.warmup`) and waits for it."""
    self._call("warmup")

  def load_context(self, name: str, loader: Callable[[MoskaEngine], Any]) -> None:
    """`MoskaEngine.load_context(name, loader(engine))` in the core, where the store's memory
    lives: `loader` is a picklable callable that makes the store from the core's engine, e.g.
    `functools.partial(moska_jax.serve_setup.engine_context_store, path=PATH)`. Returns once the
    context is resident. The loader runs on the core's stepping thread: the running requests
    (of every context) pause while it makes the store (reads it, or prefills a text).

    Raises:
      ValueError: `MoskaEngine.load_context`'s or the loader's error (another type's name and
        message, e.g. a FileNotFoundError, as a ValueError's message).
      RuntimeError: the core is gone.
    """
    self._call("load_context", name, pickle.dumps(loader))

  def unload_context(self, name: str) -> None:
    """`MoskaEngine.unload_context` in the core: the context's requests end ("cancelled")
    before this returns.

    Raises:
      ValueError: an unknown context, or the default one.
      RuntimeError: the core is gone.
    """
    if name not in self._contexts:
      raise unknown_context(name, self._contexts)
    self._call("unload_context", name)

  def _call(self, kind: str, *args) -> None:
    """Sends a command the core answers with "done" and waits for the answer."""
    call, reply = next(self._call_ids), concurrent.futures.Future()
    self._calls[call] = reply
    try:
      self._send((kind, call, *args))
      error = reply.result()
    finally:
      self._calls.pop(call, None)
    if error is not None:
      raise ValueError(error)

  def start(self, switch_interval: float | None = None) -> None:
    """Checks the core runs (it steps from construction on; the front end has no stepping
    thread, so switch_interval is ignored).

    Raises:
      RuntimeError: the core is gone.
    """
    del switch_interval
    if self._error is not None:
      raise RuntimeError(self._error)

  def stop(self, timeout: float = 30.0) -> None:
    """Ends the core (its open requests end with "error") and waits for it to exit."""
    if self._process.is_alive():
      with contextlib.suppress(RuntimeError):  # the core exited meanwhile
        self._send(("stop",))
      self._process.join(timeout)
      if self._process.is_alive():
        self._process.kill()
        self._process.join()
    self._reader.join(timeout)
    self._outbox.put(None)
    self._sender.join(timeout)
    self._conn.close()

  # ---- the pipe -------------------------------------------------------------------------------

  def _send(self, message: tuple, opens: Request | None = None) -> None:
    """Queues a command for the core (the sender thread writes it); `opens`: the request it
    submits, made open under the lock the reader takes to declare the core gone, so a request
    is either refused here or open when the reader ends the open ones.

    Raises:
      RuntimeError: the core is gone.
    """
    payload = pickle.dumps(message)  # here, so an unpicklable argument is the caller's error
    with self._send_lock:
      if self._error is not None:
        raise RuntimeError(self._error)
      if opens is not None:
        self._open[opens.id] = opens  # before the core can answer
      self._outbox.put(payload)

  def _send_loop(self) -> None:
    """The sender thread: writes the queued (pickled) commands in order. A write that fails
    means the core is gone, which the reader finds (the pipe's other end closed) and answers."""
    while (payload := self._outbox.get()) is not None:
      try:
        self._conn.send_bytes(payload)
      except OSError:
        return

  def _read(self) -> None:
    """The reader thread: applies the core's messages until the pipe closes (or a message it
    cannot apply, after which the core is stopped: nothing it sends could be read)."""
    try:
      while True:
        try:
          message = self._conn.recv()
        except (EOFError, OSError):
          break
        if message[0] == "step":
          self._apply(*message[1:])
        elif message[0] == "done":  # the contexts as the core's answers order them
          call, self._contexts, error = message[1:]
          reply = self._calls.get(call)
          if reply is not None:
            reply.set_result(error)
    except Exception:
      log.exception("the engine process's reader failed; stopping the core")
      self._process.kill()
    self._process.join(30)
    with self._send_lock:  # no command opens a request after this (`_send`)
      self._error = f"the engine process exited (code {self._process.exitcode})"
      doomed = list(self._open)
    for reply in self._calls.copy().values():  # a copy: callers pop theirs meanwhile
      if not reply.done():
        reply.set_exception(RuntimeError(self._error))
    self._apply([], [(rid, "error", self._error) for rid in doomed], None)

  def _apply(self, tokens: list, ends: list, status: dict | None) -> None:
    """One step's message: the requests' tokens and ends, then the streams' hand-over."""
    for rid, token in tokens:
      r = self._open[rid]
      r.tokens.append(token)
      self._notify(r, token)
    for rid, reason, error in ends:
      r = self._open.pop(rid)
      r.finish_reason, r.error = reason, error
      self._notify(r, None)
      r.finished_event.set()
    if status is not None:
      self.stats = collections.Counter(status["stats"])
      self.last_step_seconds, self.active_requests = (status["last_step_seconds"],
                                                      status["active_requests"])
      self._core_queue, self.free_pages = status["queue_length"], status["free_pages"]
      self._compilations = status["compilations"]
    pending, self._events = self._events, collections.defaultdict(list)
    hand_over(pending)

  def _notify(self, r: Request, token: int | None) -> None:
    if r.on_event is not None:
      try:
        r.on_event(r, token)
      except Exception:  # a client's callback must not stop the reader
        log.exception("on_event of request %d failed", r.id)


def _core_main(conn, factory: Callable[..., MoskaEngine], kwargs: dict, env: dict) -> None:
  """The core process: builds the engine, then steps it, reading commands between steps."""
  os.environ.update(env)
  try:
    engine = factory(**kwargs)
  except Exception:
    conn.send(("failed", traceback.format_exc()))
    return
  def contexts() -> dict[str, int]:
    return {name: engine.context_tokens(name) for name in engine.contexts}

  conn.send(("ready", dict(
      contexts=contexts(), default_context=engine.default_context,
      request_limit=engine._request_limit(), max_batch=engine.max_batch,
      model_config=engine.model_config)))
  requests: dict[int, Request] = {}  # rid -> the engine's request
  tokens, ends = [], []

  def report() -> None:
    """Sends the tokens and ends since the last report, with the engine's status."""
    conn.send(("step", tokens[:], ends[:], dict(
        stats=dict(engine.stats), last_step_seconds=engine.last_step_seconds,
        queue_length=engine.queue_length, active_requests=engine.active_requests,
        free_pages=len(engine.cache.free_pages), compilations=engine.compilations())))
    tokens.clear()
    ends.clear()

  def on_event(rid: int, r: Request, token: int | None) -> None:
    if token is None:
      ends.append((rid, r.finish_reason, r.error))
      del requests[rid]
    else:
      tokens.append((rid, token))

  def command(message: tuple) -> bool:
    """Applies one command; False: stop."""
    kind = message[0]
    if kind == "submit":
      rid, prompt, max_new, sampling, eos_id, context = message[1:]
      try:
        requests[rid] = engine.submit(prompt, max_new, sampling, eos_id=eos_id,
                                      context=context,
                                      on_event=functools.partial(on_event, rid))
      except ValueError as e:
        ends.append((rid, "error", str(e)))
    elif kind == "cancel":
      if message[1] in requests:
        engine.cancel(requests[message[1]])
    elif kind in ("warmup", "load_context", "unload_context"):
      call, args, error = message[1], message[2:], None
      try:
        if kind == "warmup":
          engine.warmup()
        elif kind == "load_context":
          engine.load_context(args[0], pickle.loads(args[1])(engine))
        else:
          engine.unload_context(args[0])
      except Exception as e:  # the caller's error (a store path that does not exist, ...)
        error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
      report()  # the requests an unload ended, before the answer
      conn.send(("done", call, contexts(), error))
    return kind != "stop"

  idle = True
  try:
    while True:
      if idle:
        conn.poll(None)  # nothing to step: wait for a command
      while conn.poll():
        if not command(conn.recv()):
          return
      try:
        idle = not engine.step()
      except Exception:  # the step's requests got their error; keep serving the others
        log.exception("engine step failed")
        idle = False
      if tokens or ends or not idle:
        report()
  except (EOFError, OSError):  # the front end is gone
    return
