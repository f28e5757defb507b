"""`python -m moska_jax.serve --engine_process` (the engine stepping in a child process,
`moska_jax.serve_core.EngineProcess`) against the in-process server, both on the tiny model on
localhost: the same greedy text completed and streamed, the same OpenAI-shaped errors, a
disconnecting client freeing its slot in the core, a dead core answered with 503, and a shutdown
that leaves no child process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from moska_jax.sampling import Sampling  # noqa: E402
from tests.test_serve import disconnect_after_first_token, socket_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["What is MoSKA?", "héllo wörld"]
NEW = 8


class Served:
  """`python -m moska_jax.serve` on a free port, as a subprocess."""

  def __init__(self, *flags):
    with socket_port() as port:
      pass
    self.url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "moska_jax.serve", "--model=tiny", f"--port={port}",
         "--num_pages=32", "--max_batch=4", "--prefill_lanes=1", *flags], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def wait_up(self):
    deadline = time.time() + 240
    while True:
      assert self.proc.poll() is None, self.proc.stdout.read()
      assert time.time() < deadline, "the server did not come up"
      try:
        if httpx.get(self.url + "/health", timeout=1).status_code == 200:
          return self
      except httpx.TransportError:
        time.sleep(0.3)

  def post(self, **body):
    return httpx.post(self.url + "/v1/completions", timeout=60,
                      json=dict(model="tiny", max_tokens=NEW, temperature=0) | body)

  def metric(self, name):
    return float(next(line.split()[-1] for line in httpx.get(self.url + "/metrics").text
                      .splitlines() if line.startswith(name)))

  def children(self) -> list[int]:
    """The pids whose parent is the server (the engine core, multiprocessing's tracker)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
      try:
        with open(f"/proc/{pid}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
            out.append(int(pid))
      except (OSError, IndexError):
        pass
    return out

  def close(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(30)


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.fixture(scope="module")
def servers():
  started = [Served()]
  try:
    # The in-process server first: the cores then load its warmed-up steps from the suite's
    # compilation cache (all three compile the same programs).
    started[0].wait_up()
    started += [Served("--engine_process"), Served("--engine_process")]
    yield [s.wait_up() for s in started]  # in-process, core, a core to kill
  finally:
    for s in started:
      s.close()


def _stream(server, prompt) -> list[dict]:
  """The choices of a completion stream's events, up to its [DONE]."""
  choices = []
  with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json=dict(
      model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, stream=True)) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if line.startswith("data: {"):
        choices.append(json.loads(line[6:])["choices"][0])
      elif line == "data: [DONE]":
        return choices
  raise AssertionError("the stream ended without [DONE]")


def test_the_core_completes_and_streams_the_in_process_servers_text(servers):
  inproc, core, _ = servers
  for prompt in PROMPTS:
    ref = inproc.post(prompt=prompt).json()["choices"][0]
    got = core.post(prompt=prompt).json()
    assert got["choices"][0]["text"] == ref["text"] and got["choices"][0]["finish_reason"] == (
        "length") and got["usage"]["completion_tokens"] == NEW
    events = _stream(core, prompt)
    assert "".join(e["text"] for e in events) == ref["text"]
    assert events[0]["text"] == "" and [e["finish_reason"] for e in events][-2:] == [None,
                                                                                    "length"]
  assert core.metric('moska_requests_total{reason="length"}') >= 2 * len(PROMPTS)


def test_errors_are_the_in_process_servers(servers):
  inproc, core, _ = servers
  for body in (dict(prompt="hi", context="nope"), dict(prompt="x" * 600),
               dict(prompt=[1, 2, 999]), dict(prompt="hi", max_tokens=0)):
    want, got = inproc.post(**body), core.post(**body)
    assert got.status_code == want.status_code >= 400 and got.json() == want.json()
  assert core.post(prompt="still serving").status_code == 200


def test_a_disconnecting_client_frees_its_slot_in_the_core(servers):
  _, core, _ = servers
  cancelled = core.metric('moska_requests_total{reason="cancelled"}')
  disconnect_after_first_token(core.url, 400)
  deadline = time.time() + 30
  while core.metric('moska_requests_total{reason="cancelled"}') == cancelled:
    assert time.time() < deadline, "the disconnect did not cancel the request"
    time.sleep(0.05)
  assert core.metric("moska_active_requests") == 0
  # Its pages came back: a request of the whole budget fits again.
  assert core.post(prompt="x", max_tokens=400).json()["usage"]["completion_tokens"] == 400


def test_a_dead_core_answers_503_and_shutdown_leaves_no_child(servers):
  _, core, doomed = servers
  children = core.children()
  assert children  # the core (and multiprocessing's resource tracker)
  core.proc.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown stops the core
  assert core.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
  deadline = time.time() + 10
  while any(map(_alive, children)):
    assert time.time() < deadline, f"children left: {[p for p in children if _alive(p)]}"
    time.sleep(0.05)
  # A core that died: requests fail at once with 503, the front end keeps answering.
  spawned = [p for p in doomed.children() if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
  assert len(spawned) == 1
  os.kill(spawned[0], signal.SIGKILL)
  deadline = time.time() + 10
  while httpx.get(doomed.url + "/health").json()["status"] == "ok":
    assert time.time() < deadline, "the front end did not notice the dead core"
    time.sleep(0.05)
  assert httpx.get(doomed.url + "/health").status_code == 503  # probes stop routing here
  for stream in (False, True):
    r = doomed.post(prompt="hi", stream=stream)
    assert r.status_code == 503 and "the engine process exited" in r.json()["error"]["message"]


class _BreaksInTheCore:
  """Pickles in the front end; rebuilding it (divmod(1, 0)) raises in the core."""

  def __reduce__(self):
    return divmod, (1, 0)


def _slow_store(engine, *, path: str, seconds: float):
  """A loader that takes `seconds` before it makes the store (runs in the core)."""
  from moska_jax.serve_setup import engine_context_store

  time.sleep(seconds)
  return engine_context_store(engine, path=path)


def test_contexts_load_and_unload_in_the_core(tmp_path, monkeypatch):
  """`EngineProcess.load_context` makes the store in the core from a path (here a text file):
  a request on it gives the tokens of an engine built with that context; unloading ends its
  running request before it returns; a bad path, a loader the core cannot rebuild and an
  unknown name are errors, and the core keeps serving after them. While a loader runs, submits
  return at once (the pipe fills, the sender thread waits, not the caller); a call whose caller
  stopped waiting (interrupted) does not hand its answer to the next call."""
  import concurrent.futures
  import functools
  import threading

  from moska_jax.sampling import Sampling

  from moska_jax.serve_setup import build_engine, engine_context_store
  from moska_jax.serve_core import EngineProcess

  doc = tmp_path / "doc.txt"
  doc.write_text("MoSKA serves many requests that share one long context. " * 4)
  # The servers' geometry (`Served`): the core's one-context steps load from the compilation
  # cache they filled.
  spec = dict(model="tiny", max_batch=4, num_pages=32, prefill_lanes=1, backend="xla")
  want = build_engine(**spec, contexts={"default": None, "doc": str(doc)}).generate(
      ["Who serves?"], NEW, context="doc")[0].tokens
  core = EngineProcess(build_engine, spec, env={"JAX_PLATFORMS": "cpu"}, timeout=240)
  try:
    core.load_context("doc", functools.partial(engine_context_store, path=str(doc)))
    assert set(core.contexts) == {"default", "doc"}
    r = core.submit("Who serves?", NEW, context="doc")
    assert r.finished_event.wait(120) and r.tokens == want
    # A sampled request without a seed keeps the one drawn for it, on this side too (replay).
    sampled = core.submit("Who serves?", 2, Sampling(temperature=1.0), context="doc")
    assert sampled.sampling.seed is not None and sampled.finished_event.wait(120)
    long = core.submit("Who serves?", 200, context="doc")
    deadline = time.time() + 120
    while not long.tokens:
      assert time.time() < deadline and core.running
      time.sleep(0.01)
    core.unload_context("doc")
    assert long.done and long.finish_reason == "cancelled" and core.contexts == ("default",)
    with pytest.raises(ValueError, match="FileNotFoundError"):
      core.load_context("gone", functools.partial(engine_context_store,
                                                  path=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="ZeroDivisionError"):
      core.load_context("broken", _BreaksInTheCore())
    with pytest.raises(ValueError, match="unknown context"):
      core.unload_context("doc")
    r = core.submit("still here?", 2)
    assert r.finished_event.wait(120) and r.finish_reason == "length"
    with pytest.raises(ValueError, match="sampling must be a Sampling"):
      core.submit("x", 2, sampling={"temperature": 1.0})
    class Local(Sampling):  # a valid Sampling that cannot be pickled (a local class)
      pass

    with pytest.raises(Exception, match="pickle"):  # the caller's error, not the sender's
      core.submit("x", 2, Local())

    slow = functools.partial(_slow_store, path=str(doc), seconds=3.0)
    loading = threading.Thread(target=core.load_context, args=("slow", slow))
    loading.start()
    time.sleep(0.5)  # the core is in the loader
    prompt = "x" * (core._request_limit() - 1)
    took = []
    for _ in range(1000):  # ~1 MB of pickled prompts: past a socket pair's buffers
      t0 = time.perf_counter()
      core.cancel(core.submit(prompt, 1))
      took.append(time.perf_counter() - t0)
    loading.join()
    assert max(took) < 1.0, took
    assert "slow" in core.contexts
    core.unload_context("slow")  # two contexts again: the steps compiled for "doc" serve "again"

    real, interrupted = concurrent.futures.Future.result, []

    def result(self, timeout=None):  # the first wait is interrupted, as by Ctrl-C
      if not interrupted:
        interrupted.append(True)
        raise KeyboardInterrupt
      return real(self, timeout)

    monkeypatch.setattr(concurrent.futures.Future, "result", result)
    with pytest.raises(KeyboardInterrupt):
      core.load_context("again", functools.partial(_slow_store, path=str(doc), seconds=1.0))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="ZeroDivisionError"):  # its own answer
      core.load_context("broken", _BreaksInTheCore())
    assert "again" in core.contexts and core.running
    r = core.submit("still here?", 2, context="again")
    assert r.finished_event.wait(120) and r.finish_reason == "length"
  finally:
    core.stop()
