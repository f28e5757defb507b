"""The absl experiment launcher: --list, errors, and every CPU-capable experiment at tiny size."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# experiment -> tiny flags that make it a CPU smoke run (backend xla: no Pallas compile on CPU).
TINY = {
    "demo": ["--demo_shared=400", "--demo_requests=3", "--demo_batch=2", "--demo_new_tokens=3",
             "--demo_chunk=128"],
    "shared_attention": ["--backend=xla", "--shared_lengths=1024", "--shared_batches=2",
                         "--shared_baselines=xla", "--shared_heads=8", "--shared_kv_heads=2",
                         "--shared_head_dim=64"],
    "unique_attention": ["--backend=xla", "--unique_batches=1", "--unique_lengths=256",
                         "--unique_page_sizes=16", "--unique_heads=8", "--unique_kv_heads=2",
                         "--unique_head_dim=64"],
    "sparse_attention": ["--backend=xla", "--sparse_length=2048", "--sparse_chunks=256",
                         "--sparse_batches=2", "--sparse_sparsities=0.75", "--sparse_heads=8",
                         "--sparse_kv_heads=2", "--sparse_head_dim=64"],
    "decode": ["--backend=xla", "--dtype=float32", "--decode_model=tiny", "--decode_layers=1",
               "--decode_shared=512", "--decode_unique=64", "--decode_batches=2",
               "--decode_chunk=128", "--decode_page=16"],
    "disaggregation": ["--backend=xla", "--disagg_length=2048", "--disagg_batches=2",
                       "--disagg_shared_counts=1,2", "--disagg_chunk=256",
                       "--disagg_unique_length=256", "--disagg_page_size=16", "--disagg_heads=8",
                       "--disagg_kv_heads=2", "--disagg_head_dim=64", "--disagg_copy_mb=4"],
    "roofline": ["--roofline_shared_lengths=1048576", "--roofline_batches=1,64"],
    # A 2-layer model on 8-record documents: 300 steps on CPU.
    "train_retrieval": ["--train_layers=2", "--train_hidden=64", "--train_heads=4",
                        "--train_kv_heads=2", "--train_head_dim=16", "--train_mlp=64",
                        "--train_keys=64", "--train_values=16", "--train_start_length=33",
                        "--train_length=33", "--train_batch_tokens=2048",
                        "--train_max_steps=300", "--train_eval_every=100",
                        "--train_eval_docs=16"],
    # The committed checkpoint, on short documents; sparsity 0 keeps every chunk (= dense).
    "accuracy": ["--dtype=float32", "--accuracy_length=1024", "--accuracy_docs=1",
                 "--accuracy_questions=32", "--accuracy_batch=32", "--accuracy_chunks=128",
                 "--accuracy_summaries=envelope", "--accuracy_sparsities=0,0.75"],
}


def _check_train_retrieval(out_dir):
  """It learned: held-out accuracy of the saved weights well above chance (1/16)."""
  meta = json.load(open(os.path.join(out_dir, "retrieval_checkpoint", "retrieval.json")))
  assert meta["eval_accuracy"] > 3 / 16, meta


def _check_accuracy(out_dir):
  """The committed model retrieves; keeping every chunk reproduces dense exactly."""
  rows = list(csv.DictReader(l for l in open(os.path.join(out_dir, "accuracy.csv"))
                             if not l.startswith("#")))
  dense = [r for r in rows if r["mode"] == "dense"][0]
  assert float(dense["accuracy"]) >= 0.9, dense
  for r in rows:
    if r["mode"] == "sparse" and float(r["sparsity"]) == 0.0:
      assert r["accuracy"] == dense["accuracy"] and float(r["attn_rel_err"]) < 1e-5, r


CHECKS = {"train_retrieval": _check_train_retrieval, "accuracy": _check_accuracy}


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_list_names_every_experiment():
  from experiments.run import EXPERIMENTS
  res = _run("--list")
  assert res.returncode == 0, res.stderr
  for name in EXPERIMENTS:
    assert name in res.stdout


def test_unknown_experiment_is_a_clear_error():
  res = _run("--experiment=nope")
  assert res.returncode != 0
  assert "unknown experiment 'nope'" in res.stderr


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_writes_csv_md_png(name, tmp_path):
  res = _run(f"--experiment={name}", f"--out_dir={tmp_path}", *TINY[name])
  assert res.returncode == 0, res.stderr[-3000:]
  written = os.listdir(tmp_path)
  for ext in (".csv", ".md", ".png"):
    assert any(f.endswith(ext) for f in written), (ext, written)
  md = open(tmp_path / f"{name}.md").read()
  for key in ("device", "jax", "date", "command", "flags"):
    assert f"- {key}:" in md
  if name in CHECKS:
    CHECKS[name](tmp_path)
