"""Measured tuning tables: which entry a call uses, and when the heuristic plans instead."""

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import dispatch, targets, tuning_table

OP = "shared_attention"
KEY = dict(op=OP, Hkv=8, G=4, D=128, T=1, dtype="bfloat16", kv_dtype="bfloat16")
TRITON = pk.TritonSharedConfig(block_m=64, block_k=32, num_splits=7, num_warps=4, num_stages=2)
MOSAIC = pk.MosaicGpuSharedConfig(block_k=128, num_splits=9, num_stages=3, consumers=1)


def _args(B, D=128, S=65536):
  return (jax.ShapeDtypeStruct((B, 1, 32, D), jnp.bfloat16),
          jax.ShapeDtypeStruct((S, 8, D), jnp.bfloat16), jax.ShapeDtypeStruct((S, 8, D),
                                                                               jnp.bfloat16))


def _plan(*args, **kwargs):
  """The GPU plan (the table applies to compiled calls on a GPU target)."""
  return pk.plan(OP, *args, backend="gpu", **kwargs)


def _entry(M, implementation, config, key=KEY, S=65536):
  return dict(key=key, M=M, S=S, implementation=implementation,
              config=dataclasses.asdict(config), ms=1.0)


@pytest.fixture
def table(tmp_path, monkeypatch):
  """Writes a table for chip `chip` to a file $PALLAS_KERNELS_TUNING names."""

  def make(entries, chip="NVIDIA H100"):
    path = tmp_path / f"{tuning_table.chip_slug(chip)}.json"
    tuning_table.write(path, chip, entries)
    monkeypatch.setenv(tuning_table.ENV, str(path))

  return make


def test_nearest_entry_within_a_factor_of_two(table):
  table([_entry(32, "triton", TRITON), _entry(4, "mosaic_gpu", MOSAIC)])
  plan = _plan(*_args(8), target="h100")  # M = 32: exact
  assert (plan.implementation, plan.config) == ("triton", TRITON)
  plan = _plan(*_args(12), target="h100")  # M = 48: nearer 32 than 4
  assert (plan.implementation, plan.config) == ("triton", TRITON)
  plan = _plan(*_args(1), target="h100")  # M = 4
  assert (plan.implementation, plan.config) == ("mosaic_gpu", MOSAIC)
  with tuning_table.ignored():
    heuristic = _plan(*_args(32), target="h100")
  assert _plan(*_args(32), target="h100") == heuristic  # M = 128: 4x past the table


def test_other_keys_chips_and_modes_use_the_heuristic(table):
  table([_entry(32, "triton", TRITON)])
  with tuning_table.ignored():
    heuristic = _plan(*_args(8), target="h100")
  assert heuristic.config != TRITON
  assert _plan(*_args(8, D=64), target="h100").config != TRITON  # another key
  assert _plan(*_args(8), target="a100").config != TRITON  # another chip
  assert _plan(*_args(8), target="h100", interpret=True).config != TRITON
  given = dataclasses.replace(TRITON, num_splits=2)
  assert _plan(*_args(8), config=given, target="h100").config == given
  assert _plan(*_args(8), target="h200").config != TRITON  # "NVIDIA H200 SXM"


def test_entries_hold_near_their_s_and_row_tiles(table):
  """An entry measured at S=65536 plans S in [32K, 128K] only, and never where its row blocks
  would read K/V more often than when it was measured."""
  narrow = dataclasses.replace(TRITON, block_m=16)
  table([_entry(32, "triton", narrow), _entry(128, "mosaic_gpu", MOSAIC)])
  assert _plan(*_args(8, S=131072), target="h100").config == narrow
  assert _plan(*_args(8, S=262144), target="h100").config != narrow  # 4x S
  with tuning_table.ignored():
    heuristic = _plan(*_args(12), target="h100")
  # M=48: the nearest entry, M=32, has 16-row blocks: 3 reads of K/V where it measured 2
  assert _plan(*_args(12), target="h100") == heuristic


def test_unique_entries_hold_at_any_batch(table):
  """Paged unique attention: a request's rows are one tile whatever B is, so an entry plans
  batches up to its M ratio (not refused as if B's rows shared one K/V)."""
  key = dict(op="unique_attention", Hkv=8, G=4, D=128, T=1, dtype="bfloat16",
             kv_dtype="bfloat16", page_size=16)
  config = pk.TritonUniqueConfig(pages_per_block=4, num_splits=2, num_stages=3)
  table([_entry(256, "triton", config, key=key, S=4096)])
  for B in (40, 96):  # M = 160, 384: within 2x of 256
    pool = jax.ShapeDtypeStruct((B * 256 + 1, 16, 8, 128), jnp.bfloat16)
    plan = pk.plan("unique_attention", jax.ShapeDtypeStruct((B, 1, 32, 128), jnp.bfloat16),
                   pool, pool, jax.ShapeDtypeStruct((B, 256), jnp.int32),
                   jax.ShapeDtypeStruct((B,), jnp.int32), backend="gpu", target="h100")
    assert plan.config.pages_per_block == 4 and plan.config.num_stages == 3


def test_splits_refit_to_the_call(table):
  table([_entry(32, "triton", dataclasses.replace(TRITON, num_splits=64), S=1024)])
  plan = _plan(*_args(8, S=1000), target="h100")  # 32 tiles of 32 keys
  assert plan.config.num_splits == 32


def test_an_entry_that_cannot_run_is_logged_and_skipped(table, caplog):
  wide = pk.TritonSharedConfig(block_m=128, block_k=256, num_splits=4, num_stages=6)
  table([_entry(32, "triton", wide), dict(_entry(4, "triton", TRITON), config={"nope": 1})])
  with caplog.at_level(logging.INFO, logger="pallas_kernels"):
    plan = _plan(*_args(8), target="h100")
  assert plan.config != wide and "shared memory" in caplog.text
  with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
    assert _plan(*_args(1), target="h100").config != TRITON
  assert "refuses" in caplog.text


def test_unreadable_table_is_not_used(tmp_path, monkeypatch, caplog):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"chip": "NVIDIA H100", "entries": []}))  # no version
  monkeypatch.setenv(tuning_table.ENV, str(path))
  with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
    assert _plan(*_args(8), target="h100").config != TRITON
  assert "not a version" in caplog.text


@pytest.mark.parametrize("shipped", tuning_table._packaged(), ids=lambda t: t["chip"])
def test_packaged_tables_plan_on_their_chip(shipped):
  """Every entry of a shipped table is a config its implementation accepts for its key on the
  preset of its chip."""
  chip = next(t for t in targets.GPU_PRESETS.values()
              if tuning_table.chip_slug(t.name).startswith(tuning_table.chip_slug(shipped["chip"])))
  assert shipped["entries"]
  for e in shipped["entries"]:
    k = e["key"]
    B = max(1, e["M"] // (k["T"] * k["G"]))
    q = jax.ShapeDtypeStruct((B, k["T"], k["Hkv"] * k["G"], k["D"]), k["dtype"])
    op = dispatch.OPS[k["op"]]
    if k["op"] == OP:
      kv = jax.ShapeDtypeStruct((e["S"], k["Hkv"], k["D"]), k["kv_dtype"])
      args = (q, kv, kv)
    else:
      pages = e["S"] // k["page_size"]
      kv = jax.ShapeDtypeStruct((B * pages + 1, k["page_size"], k["Hkv"], k["D"]), k["kv_dtype"])
      args = (q, kv, kv, jax.ShapeDtypeStruct((B, pages), jnp.int32),
              jax.ShapeDtypeStruct((B,), jnp.int32))
    assert tuning_table.key_of(k["op"], op.problem(*args)) == k
    plan = pk.plan(k["op"], *args, backend="gpu", target=chip)
    assert plan.implementation == e["implementation"]
