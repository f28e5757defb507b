"""The absl experiment launcher: --list, errors, and every CPU-capable experiment at tiny size."""

import importlib
import logging
import os
import subprocess
import sys

import pytest

from experiments.goals import GOALS
from tests import one_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# experiment -> tiny flags that make it a CPU smoke run (backend xla: no Pallas compile on CPU;
# --shape=tiny: Hq=4, Hkv=1, D=16). train_retrieval and accuracy run together in
# test_retrieval_experiments.py.
TINY = {
    "demo": ["--demo_shared=400", "--demo_requests=2", "--demo_batch=1", "--demo_new_tokens=2",
             "--demo_chunk=128"],  # one slot: 2 step shapes to compile per engine, not 3
    "shared_attention": ["--backend=xla", "--shape=tiny", "--shared_lengths=1024",
                         "--shared_batches=2", "--shared_baselines=xla"],
    "unique_attention": ["--backend=xla", "--shape=tiny", "--unique_batches=1",
                         "--unique_lengths=256", "--unique_page_sizes=16"],
    "sparse_attention": ["--backend=xla", "--shape=tiny", "--sparse_length=2048",
                         "--sparse_chunks=256", "--sparse_batches=4", "--sparse_sparsities=0.75",
                         "--sparse_reuse=1,4", "--sparse_batch_aware=2",
                         "--sparse_tile_implementations=xla", "--sparse_name=sparse_attention"],
    "kernels": ["--backend=xla", "--shape=tiny", "--kernels_batches=2", "--kernels_shared=1024",
                "--kernels_unique=64", "--kernels_chunk=128",
                "--kernels_kv_dtype=float8_e4m3fn"],
    "decode": ["--backend=xla", "--dtype=float32", "--decode_model=tiny", "--decode_layers=1",
               "--decode_shared=512", "--decode_unique=64", "--decode_batches=2",
               "--decode_chunk=128", "--decode_page=16", "--decode_batch_aware=2"],
    "disaggregation": ["--backend=xla", "--shape=tiny", "--dtype=float32", "--disagg_length=2048",
                       "--disagg_batches=2", "--disagg_shared_counts=1,2",
                       "--disagg_chunk=256", "--disagg_unique_length=256",
                       "--disagg_page_size=16", "--disagg_processes=1"],
    "roofline": ["--roofline_shared_lengths=1048576", "--roofline_batches=1,64"],
    "serving": ["--backend=xla", "--dtype=float32", "--serving_layers=1", "--serving_shared=256",
                "--serving_clients=4", "--serving_new_tokens=4", "--serving_decoders=2",
                "--serving_long_prompt=256", "--serving_prefill_chunks=128",
                "--serving_base_steps=3", "--serving_load_lanes=2", "--serving_stream_interval=2",
                "--serving_engine_process", "--serving_client_processes=2"],  # still split
    "fp8": ["--backend=xla", "--shape=tiny", "--fp8_batches=2", "--fp8_shared=1024",
            "--fp8_unique=64", "--fp8_page=16"],
}
CHECKED = {"shared_attention", "unique_attention", "sparse_attention", "disaggregation"}
NOT_ON_HARNESS = {"demo"}  # it still writes its results by hand


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


# How `launch` runs one launcher command line: as `python -m experiments` runs it, in one process
# with the others (`one_process`; the TINY runs took about a quarter less CPU time than in a
# process each).
RUN = """
import runpy, sys
from absl import flags, logging  # logging defines --verbosity
flags.FLAGS.set_default("verbosity", 0)  # absl sets INFO so on a process's first app.run only

def run(run_id, args):
  sys.argv = ["run", *args]
  try:  # as experiments/__main__.py runs it; app.run always exits
    runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
  finally:
    flags.FLAGS.unparse_flags()
"""


def launch(runs: dict[str, list[str]], timeout: int = 1200) -> dict[str, tuple[int, str, str]]:
  """id -> (exit code, stdout, stderr) of the launcher run with each id's arguments, run in turn
  in one process (`one_process.run_all`)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return one_process.run_all(RUN, runs, cwd=ROOT, env=env, timeout=timeout)


# id -> arguments of runs that must stop at once (launched after the TINY ones).
REFUSED = {"unknown-experiment": ["--experiment=nope"],
           "unknown-shape": ["--experiment=kernels", "--shape=nope"],
           "demo-bfloat16": ["--experiment=demo", "--dtype=bfloat16"]}


# The launcher end to end: the chosen experiment's flags are known however --experiment is
# given (one dash; in a flagfile, with a bad --tune_ops), a bad value ends the run with the
# flag named and no traceback, and tune refuses a CPU backend. Launched in this order before
# the TINY runs (`runs`): no run's experiment module is imported by a run before it.
LAUNCHED = {
    "regime-typo": (["--experiment=sparse_attention", "--sparse_regimes=Uniform"],
                    "--sparse_regimes=['Uniform']: must be a comma-separated list of values "
                    "among: correlated, uniform"),
    "single-dash": (["-experiment=fp8", "-fp8_ops=shared"], "--fp8_ops=['shared']"),
    "flagfile": (["--flagfile={flagfile}"], "--tune_ops=['chunk_attention']"),
    "tune-on-cpu": (["--experiment=tune"], "this run's backend is cpu"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(the folder of the TINY runs' results, id -> (exit code, stdout, stderr)): `launch` of
  --help (first: absl shows the key flags adopted so far, here only demo's, the default
  experiment), --list, the LAUNCHED runs, the TINY runs (demo first: it prints the kernels that
  ran in its process, and the runs before it run none) then REFUSED, all in one process."""
  out = tmp_path_factory.mktemp("runs")
  flagfile = out / "flags"
  flagfile.write_text("--experiment=tune\n--tune_ops=chunk_attention\n")
  launched = {name: [*(a.format(flagfile=flagfile) for a in args), f"--out_dir={out / name}"]
              for name, (args, _) in LAUNCHED.items()}
  tiny = {name: [f"--experiment={name}", f"--out_dir={out / name}", *args]
          for name, args in TINY.items()}
  return out, launch({"help": ["--help"], "list": ["--list"], **launched, **tiny, **REFUSED})


def test_unknown_experiment_is_a_clear_error(runs):
  code, _, stderr = runs[1]["unknown-experiment"]
  assert code != 0
  assert "unknown experiment 'nope'" in stderr


def test_unknown_shape_is_a_clear_error(runs):
  code, _, stderr = runs[1]["unknown-shape"]
  assert code != 0
  assert "shape must be one of" in stderr and "'nope'" in stderr


def test_demo_rejects_another_dtype(runs):
  code, _, stderr = runs[1]["demo-bfloat16"]
  assert code != 0
  assert "demo runs float32" in stderr


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_writes_csv_md_png(name, runs):
  out_dir, (code, stdout, stderr) = runs[0] / name, runs[1][name]
  assert code == 0, stderr[-3000:]
  written = os.listdir(out_dir)
  for ext in (".csv", ".md", ".png"):
    assert any(f.endswith(ext) for f in written), (ext, written)
  md = open(out_dir / f"{name}.md").read()
  for key in ("device", "jax", "date", "command", "flags"):
    assert f"- {key}:" in md
  if name in CHECKED:
    assert "- correctness:" in md
  if name == "demo":  # the header says the dtype the demo runs, and the kernels that ran show
    assert "--dtype=float32" in md and "--dtype=bfloat16" not in md
    assert "kernels that ran (pallas_kernels.plans_used()): chunk_attention: " in stdout
  if name in GOALS and name not in NOT_ON_HARNESS:  # every goal has a verdict, in md and stdout
    section = md.split("## Goals\n", 1)[1]
    for goal in GOALS[name]:
      row = next(r for r in section.splitlines() if r.startswith(f"| {goal.description} |"))
      assert row.endswith(("| met |", "| missed |", "| not measured |")), row
    assert "## Goals" in stdout


def test_help_lists_every_experiment_with_one_line(runs):
  from experiments.run import EXPERIMENTS, summary
  stdout = runs[1]["help"][1]
  for name in EXPERIMENTS:
    line = next(r for r in stdout.splitlines() if r.split()[:1] == [name])
    assert summary(name) and line.split(None, 1)[1] == summary(name), line
  assert "--out_dir" in stdout and "--demo_shared" in stdout  # shared + chosen flags


def test_list_names_every_experiment(runs):
  from experiments.run import EXPERIMENTS
  code, stdout, stderr = runs[1]["list"]
  assert code == 0, stderr
  assert stdout.startswith("  demo ")
  for name in EXPERIMENTS:
    assert name in stdout


def test_default_paths_resolve_in_the_package():
  from experiments import common
  importlib.import_module("experiments.accuracy")
  assert common.FLAGS["out_dir"].default == os.path.join(ROOT, "experiments", "out")
  checkpoint = common.FLAGS["accuracy_checkpoint"].default
  assert os.path.isfile(os.path.join(checkpoint, "model_config.json")), checkpoint
  assert common.shown(f"--out_dir={common.FLAGS['out_dir'].default}") == "--out_dir=experiments/out"



def test_result_command_names_the_environment_that_changes_a_run(monkeypatch):
  """A run given more device memory (or another allocator) than JAX's default is reproducible
  only with that setting: the command in the results header carries it, as the launcher found
  it, with no path of the machine."""
  from experiments import common, run

  assert common.env_shown({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "HOME": "/root",
                           "XLA_FLAGS": "--xla_dump_to=/home/a/d --xla_gpu_cuda_data_dir=/opt/c "
                                        "--xla_force_host_platform_device_count=8"}) == {
      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
      "XLA_FLAGS": "--xla_dump_to=<path> --xla_gpu_cuda_data_dir=<path> "
                   "--xla_force_host_platform_device_count=8"}
  monkeypatch.setattr(sys, "argv", ["run.py", "--experiment=decode"])
  run.FLAGS(sys.argv)
  try:
    monkeypatch.setattr(common, "_ENV_AT_START", {})
    assert common.environment()["command"] == "python -m experiments.run --experiment=decode"
    monkeypatch.setattr(common, "_ENV_AT_START", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"})
    assert common.environment()["command"] == (
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m experiments.run --experiment=decode")
  finally:
    run.FLAGS.unparse_flags()


# id -> (arguments, fragment of the error): each bad value is refused when absl parses the
# flags, before any work, with the flag (and what it allows) named. Parsed in this process (every
# experiment's flags imported once); a subprocess per case would cost seconds each.
BAD_FLAGS = {
    "sparsity-past-1": (["--roofline_sparsity=2"], "--roofline_sparsity=2.0: must be in [0, 1)"),
    "baseline-typo": (["--shared_baselines=xal"], "--shared_baselines=['xal']"),
    "paged-length": (["--shared_lengths=1000"],
                     "every --shared_lengths value must be a multiple of 2048"),
    "fp8-implementation-and-backend": (["--fp8_implementation=triton", "--backend=xla"],
                                       "give --fp8_implementation or --backend, not both"),
    "implementation-typo": (["--kernels_implementations=trition"],
                            "--kernels_implementations=['trition']"),
    "kernels-op": (["--kernels_ops=chunk_scores"], "--kernels_ops=['chunk_scores']"),
    "no-processes": (["--disagg_processes=0"],
                     "--disagg_processes=['0']: must be a comma-separated list of integers >= 1"),
    "no-requests": (["--demo_requests=0"], "--demo_requests=0: 0 is not a positive integer"),
    "summary-typo": (["--accuracy_summaries=foo"], "--accuracy_summaries=['foo']"),
    "kv-heads": (["--train_kv_heads=3"], "--train_kv_heads must divide --train_heads"),
    "fp8-op": (["--fp8_ops=shared"], "--fp8_ops=['shared']: must be a comma-separated list of "
               "values among: shared_attention, unique_attention"),
    "ceilings-csv": (["--roofline_paper_scale_ceilings_csv=nope.csv"],
                     "--roofline_paper_scale_ceilings_csv=nope.csv: must be '' or an existing"),
}


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_experiment_flags_are_refused_when_parsed(name):
  from absl import flags

  from experiments.run import EXPERIMENTS

  for module in EXPERIMENTS.values():
    importlib.import_module(module)
  args, fragment = BAD_FLAGS[name]
  try:
    with pytest.raises(flags.Error) as refused:
      flags.FLAGS(["run", *args])
  finally:
    flags.FLAGS.unparse_flags()
  assert fragment in str(refused.value)


@pytest.mark.parametrize("name", sorted(LAUNCHED))
def test_bad_experiment_flags_stop_the_run_with_a_clear_message(name, runs):
  code, _, stderr = runs[1][name]
  assert code != 0 and LAUNCHED[name][1] in stderr, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-2000:]


def test_launcher_logs_own_info_and_library_warnings():
  from experiments import run
  import jax
  import pallas_kernels

  def record(module, level):
    path = os.path.join(os.path.dirname(module.__file__), "x.py")
    return logging.LogRecord("x", level, path, 1, "message", None, None)

  assert run._own_or_warning(record(pallas_kernels, logging.INFO))
  assert not run._own_or_warning(record(jax, logging.INFO))  # e.g. "Failed to open libtpu.so"
  assert run._own_or_warning(record(jax, logging.WARNING))


def test_runs_from_any_folder_quietly_when_jax_probes_platforms(tmp_path):
  """`python -m experiments` from a folder outside the repository, JAX_PLATFORMS unset."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = ROOT
  res = subprocess.run([sys.executable, "-m", "experiments", "--experiment=roofline",
                        f"--out_dir={tmp_path}", *TINY["roofline"]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "running experiment roofline" in res.stderr
  assert "libtpu" not in res.stderr and "Unable to initialize backend" not in res.stderr
