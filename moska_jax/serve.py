"""`python -m moska_jax.serve`: an OpenAI-compatible HTTP server over MoskaEngine.

    python -m moska_jax.serve --model=tiny --port=8000
    python -m moska_jax.serve --checkpoint=ckpt --context=manual=stores/manual \
        --context=code=code.txt --max_batch=64 --num_pages=4096

`--context NAME=PATH` (repeatable) loads a store saved by `save_shared_store` (a directory) or
builds one from a UTF-8 text file (tokenized by the server's tokenizer); the first is the
default context, read by requests that name none. Without `--context` a small built-in text is
the default context, so `--model=tiny` alone runs on a fresh CPU machine. `--model` is a preset
with random weights (`tiny`, `llama3_1_8b`); `--checkpoint` loads weights saved by
`moska_jax.checkpoint.save_params`. Needs the `serve` extra (FastAPI, uvicorn; `tokenizers` for
`--tokenizer=tokenizer.json`, else UTF-8 bytes). `--engine_process` steps the engine in a child
process (the engine core) and keeps HTTP, tokenization and the streams in this one
(moska_jax.serve_core). The API: moska_jax.serve_api.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from moska_jax.serve_setup import build_engine, build_tokenizer

flags.DEFINE_string("model", "tiny", "Model preset with random weights: tiny or llama3_1_8b.")
flags.DEFINE_string("checkpoint", None, "Weights saved by save_params (overrides --model).")
flags.DEFINE_string("model_name", None, "The model id the API serves (default: --model or the "
                    "checkpoint's directory name).")
flags.DEFINE_multi_string("context", [], "NAME=PATH: a saved store directory or a UTF-8 text "
                          "file; the first is the default context.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("max_batch", 8, "Concurrent requests (slots).")
flags.DEFINE_integer("num_pages", 256, "Unique-cache pages (page 0 is scratch).")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_integer("prefill_chunk", 32, "Prompt tokens a prefilling request feeds per step.")
flags.DEFINE_integer("prefill_lanes", None, "Prefilling requests fed per step (default "
                     "min(max_batch, 4)).")
flags.DEFINE_enum("mode", "dense", ["dense", "sparse"], "Shared attention: dense or routed.")
flags.DEFINE_float("sparsity", 0.75, "Sparse mode: fraction of the chunks skipped.")
flags.DEFINE_integer("chunk_size", 128, "Routing chunk of stores built from text.")
flags.DEFINE_string("backend", "auto", "Kernel backend (auto, gpu, tpu, xla).")
flags.DEFINE_string("tokenizer", None, "A tokenizer.json (the tokenizers package); default "
                    "UTF-8 bytes.")
flags.DEFINE_integer("max_waiting", 256,
                     "Requests submitted and not yet admitted to a slot before 429.",
                     lower_bound=1)
flags.DEFINE_integer("stream_interval", 1, "Tokens per streamed event while a stream keeps up "
                     "(larger: less server work per token for many streams).")
flags.DEFINE_integer("eos_id", None, "Token that ends a request.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of a preset's random weights.")
flags.DEFINE_boolean("engine_process", False, "Step the engine in a process of its own "
                     "(moska_jax.serve_core.EngineProcess): the HTTP event loop and the steps "
                     "then share no GIL.")
FLAGS = flags.FLAGS

def parse_contexts(specs: Sequence[str]) -> dict[str, str]:
  """NAME=PATH pairs -> {name: path}, in order.

  Raises:
    ValueError: a pair without '=', an empty name, or a name given twice.
  """
  out = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--context must be NAME=PATH, got {spec!r}")
    if name in out:
      raise ValueError(f"--context: the name {name!r} is given twice")
    out[name] = path
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import uvicorn

  from moska_jax.serve_api import create_app

  try:
    contexts = parse_contexts(FLAGS.context)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  spec = dict(model=FLAGS.model, checkpoint=FLAGS.checkpoint, contexts=contexts or None,
              max_batch=FLAGS.max_batch, num_pages=FLAGS.num_pages, page_size=FLAGS.page_size,
              prefill_chunk=FLAGS.prefill_chunk, prefill_lanes=FLAGS.prefill_lanes,
              mode=FLAGS.mode, sparsity=FLAGS.sparsity, chunk_size=FLAGS.chunk_size,
              backend=FLAGS.backend, tokenizer=FLAGS.tokenizer, seed=FLAGS.seed)
  if FLAGS.engine_process:
    from moska_jax.serve_core import EngineProcess

    engine = EngineProcess(build_engine, spec, tokenizer=build_tokenizer(FLAGS.tokenizer))
  else:
    engine = build_engine(**spec)
  name = FLAGS.model_name or (os.path.basename(os.path.normpath(FLAGS.checkpoint))
                              if FLAGS.checkpoint else FLAGS.model)
  api = create_app(engine, model_name=name, max_waiting=FLAGS.max_waiting, eos_id=FLAGS.eos_id,
                   stream_interval=FLAGS.stream_interval)
  print(f"moska-jax serving {name!r} with contexts {list(engine.contexts)} on "
        f"http://{FLAGS.host}:{FLAGS.port}", flush=True)
  uvicorn.run(api, host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
  app.run(main)
