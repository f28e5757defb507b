"""The experiments harness: goals evaluated on rows, the correctness check, named shapes."""

import math

import jax
import jax.numpy as jnp
import pytest

from experiments import harness, report, shapes
from experiments.goals import GOALS, Goal
from moska_jax import config
from pallas_kernels.reference import shared_attention_ref

ROWS = [dict(C=512, B=8, regime="uniform", x=1.1), dict(C=512, B=128, regime="uniform", x=2.5),
        dict(C=512, B=128, regime="correlated", x=0.3),
        dict(C=128, B=128, regime="uniform", x=math.nan)]


def test_each_goal_reports_the_worst_matching_row():
  goal = Goal("uniform within 1.25x", "x", "<=", 1.25, where={"regime": "uniform"})
  v = report.evaluate(goal, ROWS, keys=("C", "B"))
  assert v.verdict == "missed"  # B=128 is 2.5x; the NaN row was not measured and is left out
  assert v.measured == "worst 2.5 (C=512 B=128); 1 of 2 rows met"
  met = report.evaluate(Goal("small B", "x", "<=", 1.25, where={"B": ("<", 128)}), ROWS)
  assert met.verdict == "met" and met.measured == "worst 1.1; 1 of 1 rows met"


def test_any_goal_reports_the_best_matching_row():
  goal = Goal("best row", "x", ">=", 2.0, where={"C": 512}, over="any")
  v = report.evaluate(goal, ROWS, keys=("regime",))
  assert v.verdict == "met" and v.measured.startswith("best 2.5 (regime=uniform); 1 of 3")
  assert report.evaluate(Goal("none", "x", ">", 3.0, over="any"), ROWS).verdict == "missed"


def test_goal_without_measured_rows_and_the_markdown_section():
  absent = Goal("C=2048", "x", "<", 1.0, where={"C": 2048})
  assert report.evaluate(absent, ROWS).verdict == "not measured"
  section = report.goals_section([absent, Goal("correlated", "x", "<", 0.35,
                                               where={"regime": "correlated"})], ROWS)
  assert section.startswith("## Goals\n")
  assert "| C=2048 | x < 1 | " in section and section.count("| met |") == 1
  assert report.goals_section([], ROWS) == ""


def test_sparse_speed_goals_count_only_rows_of_measured_accurate_routing():
  """A fast operating point whose accuracy was not measured (NaN: e.g. routing reused for 16
  steps) or fell below 0.99 of dense does not meet a speed goal; an accurate one does."""
  goal = next(g for g in GOALS["sparse_attention"] if "B=8, 75%" in g.description)
  row = dict(regime="correlated", B=8, sparsity=0.75, total_over_dense=0.3)
  for acc in (math.nan, 0.98):
    assert report.evaluate(goal, [dict(row, acc_over_dense=acc)]).verdict == "not measured"
  rows = [dict(row, acc_over_dense=math.nan), dict(row, acc_over_dense=0.995,
                                                   total_over_dense=0.6)]
  assert report.evaluate(goal, rows).verdict == "missed"
  assert report.evaluate(goal, [dict(row, acc_over_dense=0.995)]).verdict == "met"


def test_sparse_accuracy_join_keeps_the_timed_points_lowest_value(tmp_path):
  """The sparse experiment joins only sparse rows without forced chunks or float8 K/V, and a
  point measured twice keeps its lower accuracy (the one a speed goal may rely on)."""
  from experiments import run  # noqa: F401  (the launcher's shared flags)
  from experiments import sparse_attention

  head = "kv_dtype,unique_kv_dtype,mode,scorer,batch_aware,reuse,always_include,sparsity,"
  (tmp_path / "a.csv").write_text(
      "# header\n" + head + "acc_over_dense\n"
      "bfloat16,bfloat16,dense,-,0,1,-,0,1.0\n"
      "bfloat16,bfloat16,sparse,int4,0,1,-,0.75,0.995\n"
      "float8_e4m3fn,float8_e4m3fn,sparse,int4,0,1,-,0.75,0.985\n"
      "bfloat16,bfloat16,sparse,int4,0,1,0,0.75,0.999\n"
      "bfloat16,bfloat16,sparse,mean,0,1,-,0.75,nan\n")
  (tmp_path / "b.csv").write_text(  # no dtype columns (an older accuracy table)
      "mode,scorer,batch_aware,reuse,always_include,sparsity,acc_over_dense\n"
      "sparse,int4,0,1,-,0.75,0.991\nsparse,int4,0,16,-,0.75,0.31\n")
  one = sparse_attention._accuracy([str(tmp_path / "a.csv")])
  assert one == {("int4", 1, 0, 0.75): 0.995}
  both = sparse_attention._accuracy([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
  assert both == {("int4", 1, 0, 0.75): 0.991, ("int4", 16, 0, 0.75): 0.31}


def test_goal_data_is_valid():
  with pytest.raises(ValueError, match="op must be"):
    Goal("bad", "x", "=>", 1.0)
  for name, goals in GOALS.items():
    for goal in goals:
      assert "issue" not in goal.description.lower(), (name, goal)


def _qkv(seed):
  return harness.qkv(jax.random.key(seed), 3, 100, shapes.parse("4/2/16"), jnp.float32)


def test_check_vs_reference_passes_the_reference_and_raises_on_a_wrong_fn():
  args = _qkv(0)
  agreement = harness.check_vs_reference(shared_attention_ref, shared_attention_ref, args)
  assert agreement.o_rel_err == 0.0 and agreement.lse_max_err == 0.0
  with pytest.raises(RuntimeError, match="disagrees with the reference"):
    harness.check_vs_reference(lambda q, k, v: shared_attention_ref(q, k, v, kv_length=50),
                               shared_attention_ref, args)
  with pytest.raises(RuntimeError, match="disagrees"):  # o right, lse off by more than tol
    harness.check_vs_reference(lambda *a: (lambda o, lse: (o, lse + 0.1))(
        *shared_attention_ref(*a)), shared_attention_ref, args)


def test_shapes_parse_and_match_the_model_presets():
  assert shapes.parse("llama3_1_8b").heads == (32, 8, 128)
  assert shapes.parse("8/2/64") == shapes.Shape("8/2/64", 8, 2, 64)
  for bad in ("nope", "8/3/64", "8/2", "0/1/16"):
    with pytest.raises(ValueError):
      shapes.parse(bad)
  for name, make in (("llama3_1_8b", config.llama3_1_8b), ("tiny", config.tiny)):
    cfg = make()
    assert shapes.SHAPES[name].heads == (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
