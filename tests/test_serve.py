"""The OpenAI-compatible server on localhost with the tiny model: the `openai` client's
completions and streams, two contexts in one server equal to two single-context engines, 32
concurrent clients, a disconnecting client freeing its slot, OpenAI-shaped errors (the server
keeps serving), /v1/models, /health, /metrics, and `python -m moska_jax.serve` alone; the
streams' detokenizer and a stream that fell behind taking its tokens in one go."""

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from flax import nnx  # noqa: E402

from moska_jax.config import MoskaConfig, tiny  # noqa: E402
from moska_jax.engine import ByteTokenizer, MoskaEngine  # noqa: E402
from moska_jax.model import Decoder  # noqa: E402
from moska_jax.prefill import build_shared_store  # noqa: E402
from moska_jax.sampling import Sampling  # noqa: E402
from moska_jax.serve_api import Server, _Detokenizer, create_app  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [f"question {i}: " + "xyz"[i % 3] * (i % 5) for i in range(32)]
NEW = 6
ENGINE = dict(max_batch=8, num_pages=96, page_size=16, prefill_chunk=16, prefill_lanes=2,
              max_request_tokens=200)


class Running:
  """A uvicorn server on a free localhost port, in a background thread."""

  def __init__(self, app):
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 120
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
      time.sleep(0.05)
    port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://127.0.0.1:{port}"

  def close(self):
    self.server.should_exit = True
    self.thread.join(30)


def disconnect_after_first_token(url: str, max_tokens: int) -> None:
  """Streams a long greedy completion and disconnects once text arrived (it holds a slot)."""
  with httpx.stream("POST", url + "/v1/completions", timeout=60, json=dict(
      model="tiny", prompt="a long answer", max_tokens=max_tokens, temperature=0,
      stream=True)) as r:
    lines = r.iter_lines()
    while json.loads(next(l for l in lines if l.startswith("data:"))[5:])["choices"][0][
        "text"] == "":
      pass


@pytest.fixture(scope="module")
def served():
  model = Decoder(tiny(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  stores = {name: build_shared_store(model, rng.integers(0, 256, 150), chunk_size=64,
                                     prefill_chunk=128, backend="xla")
            for name in ("manual", "code")}
  mcfg = MoskaConfig(backend="xla")
  engine = MoskaEngine(model, stores, mcfg, **ENGINE)
  # Greedy references: one single-context engine per context.
  refs = {name: [r.text for r in MoskaEngine(model, {name: s}, mcfg, **ENGINE).generate(
      PROMPTS, NEW)] for name, s in stores.items()}
  app = create_app(engine, model_name="tiny", max_waiting=64)
  interval = sys.getswitchinterval()
  running = Running(app)
  assert sys.getswitchinterval() == pytest.approx(2e-4)  # while serving
  client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
  yield running.url, engine, client, refs, app.state.server
  running.close()
  assert not engine.running and sys.getswitchinterval() == interval


def _error(response, status, fragment):
  assert response.status_code == status, response.text
  err = response.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"]
  return err


def test_openai_client_completions_and_streams(served):
  url, engine, client, refs, api = served
  done = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=NEW,
                                   temperature=0)
  assert done.choices[0].text == refs["manual"][3]  # the default context is the first
  assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == NEW
  pieces = [c.choices[0].text for c in client.completions.create(
      model="tiny", prompt=PROMPTS[3], max_tokens=NEW, temperature=0, stream=True)]
  assert "".join(pieces) == done.choices[0].text and len(pieces) > 2
  chat = client.chat.completions.create(model="tiny", max_tokens=NEW, temperature=0,
                                        messages=[{"role": "user", "content": "hello"}])
  streamed = client.chat.completions.create(model="tiny", max_tokens=NEW, temperature=0,
                                            messages=[{"role": "user", "content": "hello"}],
                                            stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == (
      chat.choices[0].message.content)
  # OpenAI's own forms: usage at the end of a stream, text parts, a developer message, null
  # and default-valued fields.
  chunks = list(client.chat.completions.create(
      model="tiny", max_tokens=NEW, temperature=0, stream=True, logprobs=False,
      stream_options={"include_usage": True}, response_format={"type": "text"},
      messages=[{"role": "user", "content": [{"type": "text", "text": "hel"},
                                             {"type": "text", "text": "lo"}]}]))
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW
  assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == (
      chat.choices[0].message.content)
  developer = httpx.post(url + "/v1/chat/completions", timeout=60, json=dict(
      model="tiny", max_tokens=None, max_completion_tokens=2, stream=None, temperature=0,
      messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]))
  assert developer.json()["usage"]["completion_tokens"] == 2
  assert client.models.retrieve("tiny").id == "tiny"
  seeded = [client.completions.create(model="tiny", prompt="roll", max_tokens=NEW,
                                      temperature=1.0, seed=42).choices[0].text for _ in "ab"]
  assert seeded[0] == seeded[1]  # a seeded request is reproducible


def test_two_contexts_and_32_concurrent_clients(served):
  url, engine, client, refs, api = served

  def ask(i):
    context = ("manual", "code")[i % 2]
    r = httpx.post(url + "/v1/completions", timeout=120, json=dict(
        model="tiny", prompt=PROMPTS[i], max_tokens=NEW, temperature=0, context=context))
    return r.json()["choices"][0]["text"] == refs[context][i]

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    assert all(pool.map(ask, range(32)))


def test_a_disconnecting_client_frees_its_slot(served):
  url, engine, client, refs, api = served
  cancelled = engine.stats["requests_cancelled"]
  free = len(engine.cache.free_pages)
  disconnect_after_first_token(url, 150)
  deadline = time.time() + 30
  while engine.stats["requests_cancelled"] == cancelled:
    assert time.time() < deadline, "the disconnect did not cancel the request"
    time.sleep(0.05)
  assert engine.active_requests == 0 and len(engine.cache.free_pages) == free


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
  url, engine, client, refs, api = served
  post = lambda body, path="/v1/completions", **kw: httpx.post(url + path, timeout=60,
                                                                content=body, **kw)
  body = lambda **kw: json.dumps(dict(model="tiny", prompt="hi", max_tokens=4) | kw)
  _error(post("{not json"), 400, "malformed JSON")
  _error(post(body(context="nope")), 404, "unknown context 'nope'")
  err = _error(post(body(prompt="x" * 300)), 400, "exceeds this server's per-request budget")
  assert err["code"] == "context_length_exceeded"
  _error(post(body(max_tokens=0)), 400, "max_tokens must be an integer >= 1")
  _error(post(body(max_tokens=-3)), 400, "max_tokens must be an integer >= 1")
  _error(post(body(model="gpt-9")), 404, "the model 'gpt-9' does not exist")
  _error(post(body(temperature="hot")), 400, "temperature must be a number")
  _error(post(body(n=3)), 400, "n=3 is not supported")
  for field, value in (("top_k", 1), ("min_p", 0.1), ("repetition_penalty", 2.0),
                       ("stop_token_ids", [3]), ("ignore_eos", True), ("logprobs", 0),
                       ("n", True)):  # asked for, by value and by type: never ignored
    _error(post(body(**{field: value})), 400, f"{field}={value!r} is not supported")
  _error(post(body(stream=0)), 400, "stream must be true or false")
  _error(post(body(temperature=10**400)), 400, "temperature must be a number in [0.0, 2.0]")
  _error(post(body(prompt=[2**64])), 400, "token ids must be in [0, 256)")
  _error(post(body(prompt=[1, 2, 999])), 400, "token id 999 at position 2")
  _error(post(json.dumps({"messages": []}), "/v1/chat/completions"), 400, "messages must be")
  _error(httpx.get(url + "/v1/nothing"), 404, "Not Found")
  limit, api.max_waiting = api.max_waiting, 0  # 429: nobody may wait
  try:
    _error(post(body()), 429, "requests are waiting")
  finally:
    api.max_waiting = limit
  ok = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
  assert ok.choices[0].text == refs["manual"][0] and engine.running


def test_models_health_and_metrics(served):
  url, engine, client, refs, api = served
  models = client.models.list()
  assert [m.id for m in models.data] == ["tiny"]
  contexts = httpx.get(url + "/v1/models").json()["data"][0]["contexts"]
  assert [(c["id"], c["default"]) for c in contexts] == [("manual", True), ("code", False)]
  assert httpx.get(url + "/health").json()["status"] == "ok"
  client.completions.create(model="tiny", prompt="count me", max_tokens=NEW)  # run alone too
  text = httpx.get(url + "/metrics").text
  for name in ("moska_requests_total{reason=\"length\"}", "moska_tokens_per_second",
               "moska_queue_length", "moska_batch_occupancy", "moska_step_seconds",
               "moska_generated_tokens_total"):
    assert name in text
  tokens = float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("moska_generated_tokens_total")))
  assert tokens >= NEW
  # Responses by path and status, streams included.
  count = lambda path, status: int(next((line.split()[-1] for line in httpx.get(
      url + "/metrics").text.splitlines() if line.startswith(
          f'moska_http_requests_total{{path="{path}",status="{status}"}}')), 0))
  # Paths no route serves count as one label, model ids as their route's template.
  before = (count("/v1/completions", 200), count("unmatched", 404),
            count("/v1/models/{model_id}", 404))
  list(client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True))
  httpx.get(url + "/v1/nothing")
  httpx.get(url + "/v1/else")
  httpx.get(url + "/v1/models/other")
  assert (count("/v1/completions", 200), count("unmatched", 404),
          count("/v1/models/{model_id}", 404)) == (before[0] + 1, before[1] + 2, before[2] + 1)
  assert "/v1/nothing" not in httpx.get(url + "/metrics").text
  with pytest.raises(ValueError, match="switch_interval must be > 0 seconds or None, got 0"):
    create_app(engine, switch_interval=0)
  with pytest.raises(ValueError, match="stream_interval must be an int >= 1, got 0"):
    create_app(engine, stream_interval=0)
  with pytest.raises(ValueError, match="max_waiting must be an int >= 1, got 0"):
    create_app(engine, max_waiting=0)
  with pytest.raises(ValueError, match=r"eos_id: token id 1000000 at position 0 is outside the "
                     r"vocabulary \[0, 256\)"):
    create_app(engine, eos_id=10**6)


def test_max_tokens_defaults_to_16_for_completions_and_the_budget_for_chats(served):
  """As the OpenAI API: a completion without max_tokens generates 16 tokens, a chat completion
  up to the context (here the per-request budget)."""
  url, engine, client, refs, api = served
  done = client.completions.create(model="tiny", prompt="hello", temperature=0)
  assert (done.usage.completion_tokens, done.choices[0].finish_reason) == (16, "length")
  chat = client.chat.completions.create(model="tiny", temperature=0,
                                        messages=[{"role": "user", "content": "hello"}])
  assert chat.choices[0].finish_reason == "length"
  assert chat.usage.prompt_tokens + chat.usage.completion_tokens == ENGINE["max_request_tokens"]


def test_the_end_of_sequence_token_is_not_text(served):
  url, engine, client, refs, api = served
  server = Server(engine, "tiny", 1, 89, 1)  # eos_id 89 ("Y" in bytes)
  ended = lambda reason, tokens: types.SimpleNamespace(finish_reason=reason, tokens=tokens)
  assert server.text(ended("stop", [104, 105, 89])) == "hi"
  assert server.text(ended("length", [104, 89])) == "hY"  # 89 sampled, but it did not end it


def test_a_stream_interval_sends_fewer_events_with_the_same_text(served):
  url, engine, client, refs, api = served
  pieces = {}
  step = engine._run

  def slow(plan):  # steps a client keeps up with, however loaded the machine (else a stream
    time.sleep(0.01)  # that fell behind takes its tokens in one event at any interval)
    return step(plan)

  engine._run = slow
  try:
    for interval in (1, 3):  # tokens per event while the stream keeps up
      api.stream_interval = interval
      pieces[interval] = [p for c in client.completions.create(
          model="tiny", prompt=PROMPTS[7], max_tokens=NEW, temperature=0, stream=True)
          if (p := c.choices[0].text)]
  finally:
    api.stream_interval = 1
    engine._run = step
  assert "".join(pieces[1]) == "".join(pieces[3]) == refs["manual"][7]
  # Greedy and seeded: the same tokens; bytes that end no character are held back either way.
  assert len(pieces[3]) < len(pieces[1])


def test_stream_deltas_concatenate_to_the_text():
  tok, rng = ByteTokenizer(), np.random.default_rng(0)
  valid = list("naïve € 𝄞 ok, ".encode() * 4)  # 1- to 4-byte characters
  for tokens in (valid, [int(t) for t in rng.integers(0, 256, 80)]):  # random: invalid UTF-8
    for _ in range(4):
      detok, deltas, i = _Detokenizer(tok), [], 0
      while i < len(tokens):
        k = int(rng.integers(1, 5))  # the tokens that arrived together
        deltas.append(detok.add(tokens[i:i + k]))
        i += k
      deltas.append(detok.flush())
      assert "".join(deltas) == tok.decode(tokens)
      if tokens is valid:  # a character split over tokens is never sent in part
        assert not any("\ufffd" in d for d in deltas) and sum(map(bool, deltas)) > 10


def test_a_stream_that_fell_behind_takes_its_tokens_in_one_go(served):
  url, engine, client, refs, api = served

  async def late():
    stream = engine.stream(PROMPTS[5], NEW, Sampling(temperature=0.0))
    while not stream.request.done:  # not reading meanwhile
      await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    taken = stream.drain()
    return taken, [t async for t in stream], stream.drain()

  taken, rest, after = asyncio.run(late())
  assert len(taken) >= 2 and after == []
  assert engine.decode(taken + rest) == refs["manual"][5]


def test_serve_command_starts_on_the_tiny_model_alone():
  with socket_port() as port:
    pass
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, "-m", "moska_jax.serve", "--model=tiny",
                           f"--port={port}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    while True:
      assert proc.poll() is None, proc.stdout.read()
      assert time.time() < deadline, "the server did not come up"
      try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.5)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json=dict(model="tiny", prompt="What is MoSKA?", max_tokens=4))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
  finally:
    proc.terminate()
    proc.wait(30)


class socket_port:
  """A free localhost port (closed again on exit)."""

  def __enter__(self):
    import socket
    self.sock = socket.socket()
    self.sock.bind(("127.0.0.1", 0))
    return self.sock.getsockname()[1]

  def __exit__(self, *exc):
    self.sock.close()


def test_setup_remakes_a_saved_stores_summaries_and_needs_a_checkpoints_tokenizer(tmp_path):
  """A saved store of another summary kind serves sparse (its summaries remade, as for another
  chunk size); a checkpoint whose vocabulary is not bytes needs its tokenizer."""
  from moska_jax.checkpoint import save_params
  from moska_jax.config import ModelConfig
  from moska_jax.kv_cache import save_shared_store
  from moska_jax.serve_setup import build_engine, context_store

  model = Decoder(tiny(), rngs=nnx.Rngs(0))
  save_shared_store(str(tmp_path / "store"), build_shared_store(
      model, np.arange(100) % 256, chunk_size=64, summary="mean", backend="xla"))
  mcfg = MoskaConfig(mode="sparse", chunk_size=64, sparsity=0.5, backend="xla")
  store = context_store(model, str(tmp_path / "store"), None, mcfg)
  assert store.summaries[0].kind == mcfg.summary and int(store.length) == 100
  words = Decoder(ModelConfig(vocab=1000, layers=1, hidden=32, num_heads=2, num_kv_heads=1,
                              head_dim=16, mlp_hidden=32), rngs=nnx.Rngs(0))
  save_params(str(tmp_path / "words"), words)
  with pytest.raises(ValueError, match="a model of 1000 token ids needs its --tokenizer"):
    build_engine(checkpoint=str(tmp_path / "words"), backend="xla")
