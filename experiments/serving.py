"""serving: the engine as a server: decoding latency beside a long prefill, and a load test.

Two scenarios, one table:
- "prefill beside decode": `--serving_decoders` requests decode while one prompt of
  `--serving_long_prompt` tokens arrives and is read in chunks of each `--serving_prefill_chunks`
  (one prefill lane). Reported: the decoding requests' inter-token latency (ITL) before and while
  the prompt is read (the steps' wall times: every decoding request takes one token per step),
  their ratio (goal <= 1.3), the long prompt's time to first token, and `blocked_ms`: that
  prompt's whole prefill time, what each decoding request would wait if prefill stopped decoding.
  The chunk is the per-step prefill budget: it trades the decoding requests' ITL for the long
  prompt's TTFT. On a CPU every step is compute-bound and the XLA reference's paged attention
  reads each request's whole block table (sized for the long prompt), so a mixed step costs
  several decode steps; on a GPU decode steps are bound by memory and the Pallas kernels read
  only each request's own tokens.
- "load": `--serving_clients` streaming clients at once over `--serving_contexts` contexts, each
  `--serving_prompt` prompt tokens and `--serving_new_tokens` new ones, against `generate` on the
  same requests. Transports: "generate" (the synchronous batch call), "in-process" (the async API:
  `MoskaEngine.start` + `stream`, tokens timed as the asyncio consumer receives them) and, when
  FastAPI, uvicorn and httpx are installed, "http" (the OpenAI server on localhost, SSE streams,
  its clients in `--serving_client_processes` other processes, `experiments.serving_client`, so
  they do not share the server's GIL; an event carries the tokens that arrived since the last
  one, several when the server fell behind or byte tokens end in one character, so its ITL is
  per event; past 256 ids each token is one character, `CharTokenizer`).
  Reported: tokens/s over the wall time from the first request to the last token, its ratio to
  generate's (goal >= 0.8), p50/p99 time to first token and ITL, and the engine's steps: their
  count, mean wall time (`step_ms`) and mean host time (`host_ms`: the stepping thread's work
  the device does not compute under: taking submissions, planning, dispatch, bookkeeping,
  handing the tokens over; `stats["host_seconds"]`), `dispatch_ms` (of that, the calls of
  the jitted step and its sampler: enqueueing their kernels) and `compiles`, the XLA
  compilations during the run (a step shape first met there pays its compilation inside the
  timing); over HTTP also `client_busy`, the busiest
  client process's CPU time over the run's wall time (near 1: the clients, not the server,
  limited the rate; raise `--serving_client_processes`). With `--serving_engine_process` the HTTP
  load runs again with the engine stepping in a process of its own ("http, engine process":
  `moska_jax.serve_core.EngineProcess`, built there from the same model and contexts; its
  `compiles` are the core's step compilations).

The model is the tiny decoder or Llama-3.1-8B shapes with `--serving_layers` layers (random
weights) in `--dtype`; contexts are random tokens of `--serving_shared` each.

CPU: python -m experiments.run --experiment=serving --dtype=float32 --backend=xla
GPU: python -m experiments.run --experiment=serving --serving_model=llama3_1_8b \
       --serving_layers=4 --serving_shared=32768 --serving_clients=256 --serving_new_tokens=64 \
       --serving_prefill_chunks=256,1024
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from absl import flags, logging
from flax import nnx

from experiments import common, harness
from moska_jax.config import MoskaConfig, llama3_1_8b, tiny
from moska_jax.engine import ByteTokenizer, MoskaEngine
from moska_jax.model import Decoder
from moska_jax.prefill import build_shared_store
from moska_jax.serve_core import EngineProcess

flags.DEFINE_enum("serving_model", "tiny", ["tiny", "llama3_1_8b"], "serving: model shapes.")
flags.DEFINE_integer("serving_layers", 2, "serving: decoder layers.", lower_bound=1)
flags.DEFINE_integer("serving_shared", 2048, "serving: shared tokens per context.", lower_bound=1)
flags.DEFINE_integer("serving_contexts", 2, "serving: contexts of the load test.", lower_bound=1)
flags.DEFINE_integer("serving_clients", 32, "serving: concurrent streaming clients.",
                     lower_bound=1)
flags.DEFINE_integer("serving_prompt", 32, "serving: prompt tokens per client.", lower_bound=1)
flags.DEFINE_integer("serving_new_tokens", 32, "serving: new tokens per client.", lower_bound=1)
flags.DEFINE_integer("serving_load_chunk", 64, "serving: prefill chunk of the load test.",
                     lower_bound=1)
flags.DEFINE_integer("serving_load_lanes", 8, "serving: prefill lanes of the load test.",
                     lower_bound=1)
flags.DEFINE_integer("serving_decoders", 32, "serving: decoding requests beside the long prompt.",
                     lower_bound=1)
flags.DEFINE_integer("serving_long_prompt", 4096, "serving: tokens of the long prompt.",
                     lower_bound=1)
flags.DEFINE_list("serving_prefill_chunks", ["8", "32", "128"],
                  "serving: prefill chunks of the long prompt (the per-step prefill budget).")
flags.DEFINE_integer("serving_base_steps", 20, "serving: decode steps timed before the prompt.",
                     lower_bound=1)
flags.DEFINE_integer("serving_page", 16, "serving: page size.", lower_bound=1)
flags.DEFINE_boolean("serving_http", True, "serving: also load-test over HTTP (if installed).")
flags.DEFINE_integer("serving_stream_interval", 1, "serving: the HTTP server's tokens per "
                     "streamed event while a stream keeps up (create_app's stream_interval).",
                     lower_bound=1)
flags.DEFINE_boolean("serving_engine_process", False, "serving: also load-test over HTTP with "
                     "the engine in a process of its own (python -m moska_jax.serve "
                     "--engine_process).")
flags.DEFINE_integer("serving_client_processes", 4, "serving: processes the HTTP load test's "
                     "clients run in (the requests split evenly among them).", lower_bound=1)
common.ints("serving_prefill_chunks")
FLAGS = flags.FLAGS

PREFILL, LOAD = "prefill beside decode", "load"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the client processes' path


def _ms(x) -> float:
  return float(x) * 1e3


def _pct(values, q) -> float:
  return float(np.percentile(values, q)) if len(values) else float("nan")


def _model(name: str, dtype: str, layers: int, seed: int) -> Decoder:
  make = llama3_1_8b if name == "llama3_1_8b" else tiny
  return Decoder(make(dtype=dtype, layers=layers), rngs=nnx.Rngs(seed))


def _stores(model, rng, count: int, shared: int, backend: str) -> dict:
  """`count` contexts of `shared` random tokens each, drawn from rng in order."""
  return {f"ctx{i}": build_shared_store(model, rng.integers(0, model.cfg.vocab, shared),
                                        chunk_size=128, backend=backend) for i in range(count)}


class CharTokenizer:
  """One CJK character per token id, for vocabularies past bytes: a random-weight model's tokens
  then each stream as their own text. Under the byte tokenizer, ids >= 256 (taken mod 256) form
  mostly invalid UTF-8 that the server holds back until a character completes, so the HTTP
  timings would measure that, not the server."""

  base, size = 0x4E00, 0x5200  # CJK Unified Ideographs

  def encode(self, text: str) -> list[int]:
    """Ids of a text of its own characters (the load test sends ids; this is for symmetry)."""
    ids = [ord(c) - self.base for c in text]
    if any(not 0 <= i < self.size for i in ids):
      raise ValueError("CharTokenizer.encode: text must be CJK Unified Ideographs "
                       f"(U+{self.base:04X}..U+{self.base + self.size - 1:04X})")
    return ids

  def decode(self, tokens) -> str:
    return "".join(chr(self.base + int(t) % self.size) for t in tokens)


def tokenizer(vocab: int):
  """The load test's tokenizer: bytes for the tiny model, `CharTokenizer` past 256 ids."""
  return ByteTokenizer() if vocab <= ByteTokenizer.vocab else CharTokenizer()


def _engine(model, stores, mcfg, *, batch, tokens_per_request, chunk, lanes, page=None):
  ps = page or FLAGS.serving_page
  pages = batch * -(-(tokens_per_request + chunk) // ps) + 2
  return MoskaEngine(model, stores, mcfg, max_batch=batch, num_pages=pages, page_size=ps,
                     prefill_chunk=chunk, prefill_lanes=lanes,
                     max_request_tokens=tokens_per_request, tokenizer=tokenizer(model.cfg.vocab))


def core_engine(*, model: str, dtype: str, layers: int, seed: int, contexts: int, shared: int,
                backend: str, **engine) -> MoskaEngine:
  """The load test's engine as `main` and `load` build it (the same weights and contexts: the
  same seed, the stores drawn first), in an engine-core process (`EngineProcess`), where no flag
  is parsed."""
  decoder = _model(model, dtype, layers, seed)
  stores = _stores(decoder, np.random.default_rng(seed), contexts, shared, backend)
  return _engine(decoder, stores, MoskaConfig(backend=backend), **engine)


def prefill_beside_decode(model, store, mcfg, rng, table) -> None:
  """ITL of decoding requests before and while a long prompt is read beside them."""
  D, L, base = FLAGS.serving_decoders, FLAGS.serving_long_prompt, FLAGS.serving_base_steps
  vocab = model.cfg.vocab
  for chunk in map(int, FLAGS.serving_prefill_chunks):
    # Decoding outlasts the whole prefill: the decoders' own prompts are read one per step
    # (one lane) before the timed steps.
    new = D + base + 2 * (-(-L // chunk)) + 8
    engine = _engine(model, {"ctx0": store}, mcfg, batch=D + 1,
                     tokens_per_request=max(L + 2, 16 + new), chunk=chunk, lanes=1)
    engine.warmup()
    decoders = [engine.submit(list(rng.integers(0, vocab, 16)), new) for _ in range(D)]
    while not all(r.tokens for r in decoders):
      engine.step()

    def timed_step() -> float:
      t0 = time.perf_counter()
      engine.step()
      return time.perf_counter() - t0

    before = [timed_step() for _ in range(base)]
    t0 = time.perf_counter()
    long = engine.submit(list(rng.integers(0, vocab, L)), 2)
    during = []
    while not long.tokens:
      counts = [len(r.tokens) for r in decoders]
      during.append(timed_step())
      assert all(len(r.tokens) == c + 1 for r, c in zip(decoders, counts))  # never stalled
    ttft = time.perf_counter() - t0
    table.add(scenario=PREFILL, prefill_chunk=chunk, decoders=D, long_prompt=L,
              prefill_steps=len(during), itl_ms_before=_ms(np.median(before)),
              itl_ms_during=_ms(np.median(during)), itl_p99_ms_during=_ms(_pct(during, 99)),
              itl_growth=float(np.mean(during) / np.mean(before)), long_ttft_s=ttft,
              blocked_ms=_ms(sum(during)))


def _requests(rng, vocab, names):
  n, p = FLAGS.serving_clients, FLAGS.serving_prompt
  return [(list(map(int, rng.integers(0, vocab, p))), names[i % len(names)]) for i in range(n)]


_compiles = [0]  # XLA compilations of this process so far
_marked = {}  # the stats and compilations at the last mark


def _count_compile(event: str, duration: float, **_) -> None:
  del duration
  if event == "/jax/core/compile/backend_compile_duration":
    _compiles[0] += 1


def _compilations(engine) -> int:
  """This process's XLA compilations, or an engine process's step compilations."""
  return engine.compilations() if isinstance(engine, EngineProcess) else _compiles[0]


def _mark(engine) -> None:
  """Starts a transport's run: notes the engine's stats and the compilation count."""
  _marked.update(stats=collections.Counter(engine.stats), compiles=_compilations(engine))


def _steps(engine) -> dict:
  """The engine's steps since `_mark`: count, mean wall and host ms, compilations; marks again
  for the next transport."""
  s = collections.Counter(engine.stats)
  s.subtract(_marked["stats"])
  n = s["steps_decode"] + s["steps_prefill"]
  row = dict(steps=n, step_ms=_ms(s["seconds"] / n), host_ms=_ms(s["host_seconds"] / n),
             dispatch_ms=_ms(s["dispatch_seconds"] / n),
             compiles=_compilations(engine) - _marked["compiles"])
  _mark(engine)
  return row


def _load_row(table, transport, t0, submits, times, tokens, steps, gen_rate=None, **extra):
  """A load row from per-request submit times and token arrival times, `_steps` and `extra`
  columns."""
  end = max(t[-1] for t in times)
  ttft = [t[0] - s for s, t in zip(submits, times)]
  # A stream whose tokens all came in one event has no inter-token gap (nan when none has).
  itl = np.concatenate([np.diff(t) for t in times] or [np.zeros(0)])
  rate = tokens / (end - t0)
  return table.add(scenario=LOAD, transport=transport, clients=len(times),
                   contexts=FLAGS.serving_contexts, tokens=tokens, tokens_per_s=rate,
                   x_generate=rate / gen_rate if gen_rate else 1.0,
                   ttft_p50_ms=_ms(_pct(ttft, 50)), ttft_p99_ms=_ms(_pct(ttft, 99)),
                   itl_p50_ms=_ms(_pct(itl, 50)), itl_p99_ms=_ms(_pct(itl, 99)), **steps,
                   **extra)


def _in_process(engine, requests, new):
  async def client(prompt, context, submits, times):
    stamps = []
    submits.append(time.perf_counter())
    async for _ in engine.stream(prompt, new, context=context):
      stamps.append(time.perf_counter())
    times.append(stamps)

  async def run():
    submits, times = [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(client(p, c, submits, times) for p, c in requests))
    return t0, submits, times

  engine.start()
  try:
    return asyncio.run(run())
  finally:
    engine.stop()


def _over_http(engine, requests, new):
  """The load over the OpenAI server on localhost: uvicorn in this process, the engine in this
  process too or an `EngineProcess`, the clients in `--serving_client_processes` processes
  (`experiments.serving_client`), as a deployment's clients are. Returns t0, submits, times
  (wall-clock seconds) and the busiest client process's CPU time over the run's (near 1: the
  clients limited the rate)."""
  import uvicorn

  from moska_jax.serve_api import create_app

  app = create_app(engine, model_name="m", max_waiting=1 << 20,
                   stream_interval=FLAGS.serving_stream_interval)
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/completions"
  n = min(FLAGS.serving_client_processes, len(requests))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.serving_client"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
           for _ in range(n)]
  try:
    for i, proc in enumerate(procs):
      proc.stdin.write(json.dumps(dict(url=url, model="m", new=new,
                                       requests=requests[i::n])) + "\n")
      proc.stdin.flush()
    for proc in procs:
      if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"serving: a client process failed to start (exit {proc.wait(60)})")
    _mark(engine)  # the clients' warm-up requests were answered: idle
    t0 = time.time()
    for proc in procs:
      proc.stdin.write("go\n")
      proc.stdin.flush()
    submits, times, cpu = [], [], []
    for proc in procs:
      out, _ = proc.communicate()
      if proc.returncode:
        raise RuntimeError(f"serving: a client process failed (exit {proc.returncode})")
      got = json.loads(out)
      submits += got["submits"]
      times += [[s + t for t in ts] for s, ts in zip(got["submits"], got["times"])]
      cpu.append(got["cpu_s"])
    return t0, submits, times, max(cpu) / (max(t[-1] for t in times) - t0)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    server.should_exit = True
    thread.join()


def load(model, stores, mcfg, rng, table) -> None:
  """N streaming clients over the contexts vs generate on the same requests."""
  jax.monitoring.register_event_duration_secs_listener(_count_compile)
  try:
    new, n = FLAGS.serving_new_tokens, FLAGS.serving_clients
    engine = _engine(model, stores, mcfg, batch=n,
                     tokens_per_request=FLAGS.serving_prompt + new,
                     chunk=FLAGS.serving_load_chunk, lanes=min(n, FLAGS.serving_load_lanes))
    engine.warmup()
    _mark(engine)
    requests = _requests(rng, model.cfg.vocab, list(stores))
    t0 = time.perf_counter()
    results = engine.generate([p for p, _ in requests], new, context=[c for _, c in requests])
    gen_rate = sum(len(r.tokens) for r in results) / (time.perf_counter() - t0)
    table.add(scenario=LOAD, transport="generate", clients=n, contexts=len(stores),
              tokens=n * new, tokens_per_s=gen_rate, x_generate=1.0, **_steps(engine))
    t0, submits, times = _in_process(engine, requests, new)
    _load_row(table, "in-process", t0, submits, times, sum(map(len, times)), _steps(engine),
              gen_rate)
    if not FLAGS.serving_http:
      return
    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "httpx")):
      logging.info("serving: fastapi / uvicorn / httpx missing: no HTTP load test")
      return
    servers = [("http", engine)]
    if FLAGS.serving_engine_process:
      # This process holds the accelerator's preallocated memory: the core allocates on demand.
      servers.append(("http, engine process", EngineProcess(
          core_engine, dict(model=FLAGS.serving_model, dtype=FLAGS.dtype,
                            layers=FLAGS.serving_layers, seed=FLAGS.seed, contexts=len(stores),
                            shared=FLAGS.serving_shared, backend=FLAGS.backend, batch=n,
                            tokens_per_request=FLAGS.serving_prompt + new,
                            chunk=FLAGS.serving_load_chunk,
                            lanes=min(n, FLAGS.serving_load_lanes), page=FLAGS.serving_page),
          tokenizer=tokenizer(model.cfg.vocab), env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})))
    for transport, server in servers:
      *timing, busy = _over_http(server, requests, new)
      _load_row(table, transport, *timing, n * new, _steps(server), gen_rate, client_busy=busy,
                stream_interval=FLAGS.serving_stream_interval)
  finally:
    jax.monitoring.unregister_event_duration_listener(_count_compile)


def _plot(plt, rows):
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  pre = [r for r in rows if r["scenario"] == PREFILL]
  x = np.arange(len(pre))
  a.bar(x - 0.2, [r["itl_ms_before"] for r in pre], 0.4, label="ITL, decode only")
  a.bar(x + 0.2, [r["itl_ms_during"] for r in pre], 0.4, label="ITL, beside the long prefill")
  a.set_xticks(x, [f"chunk {r['prefill_chunk']}" for r in pre])
  a.set_ylabel("ms")
  a.set_title(f"decoding beside a {FLAGS.serving_long_prompt}-token prefill")
  a.legend()
  lo = [r for r in rows if r["scenario"] == LOAD]
  b.bar([r["transport"] for r in lo], [r["tokens_per_s"] for r in lo])
  b.set_ylabel("tokens/s")
  b.set_title(f"{FLAGS.serving_clients} clients over {FLAGS.serving_contexts} contexts")
  return fig


def main() -> None:
  bench = harness.Bench(ceilings=False, shape=False)
  model = _model(FLAGS.serving_model, FLAGS.dtype, FLAGS.serving_layers, FLAGS.seed)
  rng = np.random.default_rng(FLAGS.seed)
  mcfg = MoskaConfig(backend=FLAGS.backend)
  stores = _stores(model, rng, FLAGS.serving_contexts, FLAGS.serving_shared, FLAGS.backend)
  table = bench.table("serving", "serving: decoding beside a long prefill, and a load test of "
                      "streaming clients over several contexts", keys=("scenario", "transport",
                                                                        "prefill_chunk"))
  prefill_beside_decode(model, stores["ctx0"], mcfg, rng, table)
  load(model, stores, mcfg, rng, table)
  columns = list(dict.fromkeys(c for row in table.rows for c in row))
  table.rows = [{c: row.get(c, "") for c in columns} for row in table.rows]  # one CSV header
  table.write(notes=__doc__.split("\n\n", 1)[1].split("\nCPU:")[0], plot=_plot, show=True)
