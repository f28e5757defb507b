"""Bad launcher flags: each run stops at once (before any experiment work) with a non-zero exit
and a message naming the flag. The runs go in turn through one process (`launch`: a process
each cost seconds of imports); an unknown experiment or shape name is tested in
test_launcher.py."""

import os

import pytest

from tests.test_launcher import launch

# id -> (arguments, fragment of stderr); {tmp} is a scratch directory, {file} a file in it.
CASES = {
    "out_dir-is-a-file": (["--experiment=roofline", "--out_dir={file}"], "is not a directory"),
    "out_dir-under-a-file": (["--experiment=roofline", "--out_dir={file}/sub"],
                             "is not writable: Not a directory"),
    "out_dir-unwritable": (["--experiment=roofline", "--out_dir=/proc/moska-results"],
                           "--out_dir=/proc/moska-results is not writable"),
    "shape-two-numbers": (["--experiment=roofline", "--shape=32/8"], "or Hq/Hkv/D, got '32/8'"),
    "backend-unknown": (["--experiment=roofline", "--backend=cuda"], "--backend"),
    "dtype-unknown": (["--experiment=roofline", "--dtype=float64"], "--dtype"),
    "seed-not-int": (["--experiment=roofline", "--seed=abc"], "--seed"),
    "unknown-flag": (["--experiment=roofline", "--nope=1"], "nope"),
    "positional-argument": (["--experiment=roofline", "--out_dir={tmp}", "extra"],
                            "unexpected arguments: ['extra']"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("launcher")
  (tmp / "file").write_text("")
  return launch({name: [a.format(tmp=tmp, file=tmp / "file") for a in args]
                 for name, (args, _) in CASES.items()}, timeout=300), tmp


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_flags_stop_the_run_with_a_clear_message(results, name):
  (rc, _, stderr), tmp = results[0][name], results[1]
  assert rc != 0 and CASES[name][1] in stderr, (rc, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-2000:]
  assert sorted(os.listdir(tmp)) == ["file"]  # nothing was written
