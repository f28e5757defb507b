"""The absl experiment launcher: --list, errors, and every CPU-capable experiment at tiny size."""

import os
import subprocess
import sys

import pytest

from experiments.goals import GOALS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# experiment -> tiny flags that make it a CPU smoke run (backend xla: no Pallas compile on CPU;
# --shape=tiny: Hq=4, Hkv=1, D=16). train_retrieval and accuracy run together in
# test_retrieval_experiments.py.
TINY = {
    "demo": ["--demo_shared=400", "--demo_requests=3", "--demo_batch=2", "--demo_new_tokens=3",
             "--demo_chunk=128"],
    "shared_attention": ["--backend=xla", "--shape=tiny", "--shared_lengths=1024",
                         "--shared_batches=2", "--shared_baselines=xla"],
    "unique_attention": ["--backend=xla", "--shape=tiny", "--unique_batches=1",
                         "--unique_lengths=256", "--unique_page_sizes=16"],
    "sparse_attention": ["--backend=xla", "--shape=tiny", "--sparse_length=2048",
                         "--sparse_chunks=256", "--sparse_batches=2", "--sparse_sparsities=0.75"],
    "kernels": ["--backend=xla", "--shape=tiny", "--kernels_batches=2", "--kernels_shared=1024",
                "--kernels_unique=64", "--kernels_chunk=128"],
    "decode": ["--backend=xla", "--dtype=float32", "--decode_model=tiny", "--decode_layers=1",
               "--decode_shared=512", "--decode_unique=64", "--decode_batches=2",
               "--decode_chunk=128", "--decode_page=16"],
    "disaggregation": ["--backend=xla", "--shape=tiny", "--disagg_length=2048",
                       "--disagg_batches=2", "--disagg_shared_counts=1,2", "--disagg_chunk=256",
                       "--disagg_unique_length=256", "--disagg_page_size=16", "--disagg_copy_mb=4"],
    "roofline": ["--roofline_shared_lengths=1048576", "--roofline_batches=1,64"],
    "serving": ["--backend=xla", "--dtype=float32", "--serving_layers=1", "--serving_shared=256",
                "--serving_clients=4", "--serving_new_tokens=4", "--serving_decoders=2",
                "--serving_long_prompt=256", "--serving_prefill_chunks=128",
                "--serving_base_steps=3", "--serving_load_lanes=2"],
}
CHECKED = {"shared_attention", "unique_attention", "sparse_attention", "disaggregation"}
NOT_ON_HARNESS = {"decode", "demo"}  # they still write their goals as notes


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


def test_unknown_shape_is_a_clear_error():
  res = _run("--experiment=kernels", "--shape=nope")
  assert res.returncode != 0
  assert "shape must be one of" in res.stderr and "'nope'" in res.stderr


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
  if name in CHECKED:
    assert "- correctness:" in md
  if name in GOALS and name not in NOT_ON_HARNESS:  # every goal has a verdict, in md and stdout
    section = md.split("## Goals\n", 1)[1]
    for goal in GOALS[name]:
      row = next(r for r in section.splitlines() if r.startswith(f"| {goal.description} |"))
      assert row.endswith(("| met |", "| missed |", "| not measured |")), row
    assert "## Goals" in res.stdout
