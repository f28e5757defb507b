"""Every Mosaic TPU kernel lowers for the TPU platform, for each preset TPU generation, anywhere.

TPU interpret mode checks the kernels' numerics but applies none of Mosaic's lowering rules.
Lowering for the TPU platform under `targets.lowering_for(chip)` applies them for that chip
without one: each case plans the op for its chip (`pk.plan(..., target=)`), lowers it with that
config and checks that the module holds the kernel's Mosaic custom call. What libtpu then
compiles for the chip (layout passes, VMEM fit) needs a TPU and is not checked here.

Grid (about 200 lowerings): on v5p (megacore, the default preset) the full product of head_dim x G x
T x dtype, each op's odd shapes taken in turn; on v4, v5e and v6e a subset covering every pair of
values of any two factors (shape and chip included).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels import targets
from tests.kernel_cases import pairwise

FULL_TARGET = "v5p"
# Name -> (q dtype, K/V dtype).
DTYPES = {"bf16": (jnp.bfloat16, jnp.bfloat16), "f32": (jnp.float32, jnp.float32),
          # Scaled float8 K/V, widened to bf16 in the kernel (v4-v6e have no e4m3fn matmul):
          # its own small grid (test_float8_kv_lowers_on_every_chip).
          "fp8": (jnp.bfloat16, jnp.float8_e4m3fn)}
FACTORS = {"D": (64, 128, 256), "G": (1, 4, 8), "T": (1, 4), "dtype": ("bf16", "f32")}
# Each op's own sizes: odd B, S, page counts, pool sizes; page sizes multiples of 8 (the kernel's
# sublane rule); chunk sizes whose 128-multiple key blocks divide them (C=384 -> 384, 2048 -> 512).
# B=1 with one block of kv heads leaves a core idle on the megacore chips (v4, v5p): the plans
# split S (or the pages) there.
SHAPES = {
    "shared_attention": ({"B": 1, "Hkv": 1, "S": 1000}, {"B": 3, "Hkv": 2, "S": 4097}),
    "chunk_attention": ({"B": 3, "Hkv": 2, "S": 1000, "C": 128},
                        {"B": 2, "Hkv": 2, "S": 4097, "C": 384},
                        {"B": 1, "Hkv": 1, "S": 4097, "C": 512},
                        {"B": 3, "Hkv": 2, "S": 1000, "C": 2048}),
    "unique_attention": ({"B": 1, "Hkv": 2, "page_size": 8, "max_pages": 125, "P": 251},
                         {"B": 3, "Hkv": 2, "page_size": 24, "max_pages": 43, "P": 131},
                         {"B": 2, "Hkv": 1, "page_size": 40, "max_pages": 13, "P": 27}),
    "chunk_scores": ({"B": 3, "Hkv": 2, "S": 1000, "C": 128, "int8": 0, "bits": 4},
                     {"B": 1, "Hkv": 1, "S": 4097, "C": 512, "int8": 1, "bits": 8},
                     {"B": 2, "Hkv": 2, "S": 40000, "C": 256, "int8": 0, "bits": 4},  # > 128 N
                     {"B": 2, "Hkv": 2, "S": 3000, "C": 256, "int8": 0, "bits": 8}),
}
OPS = {"shared_attention": pk.shared_attention, "chunk_attention": pk.chunk_attention,
       "unique_attention": pk.unique_attention, "chunk_scores": pk.chunk_scores}


def _cases() -> list:
  rows = []
  for op, shapes in SHAPES.items():
    indices = itertools.product(*(range(len(v)) for v in FACTORS.values()))
    for index in indices:  # shape by the sum of indices: every shape meets every factor value
      row = {name: FACTORS[name][i] for name, i in zip(FACTORS, index)}
      rows.append(dict(op=op, target=FULL_TARGET, shape=sum(index) % len(shapes), **row))
    others = tuple(t for t in sorted(targets.TPU_PRESETS) if t != FULL_TARGET)
    rows += [dict(op=op, **row) for row in pairwise(
        {"target": others, **FACTORS, "shape": tuple(range(len(shapes)))})]
  return [pytest.param(r, id=_case_id(r)) for r in rows]


def _case_id(r: dict) -> str:
  """E.g. v5p-chunk-D64-G4-T1-bf16-B3-Hkv2-S1000-C128."""
  shape = "-".join(f"{k}{v}" for k, v in SHAPES[r["op"]][r["shape"]].items())
  return f"{r['target']}-{r['op'].split('_')[0]}-D{r['D']}-G{r['G']}-T{r['T']}-{r['dtype']}-{shape}"


def _inputs(op: str, shape: dict, *, D: int, G: int, T: int, dtype: str) -> tuple[tuple, dict]:
  """ShapeDtypeStructs of the op's arguments and its static keyword arguments."""
  sds = jax.ShapeDtypeStruct
  q_dtype, kv_dtype = DTYPES[dtype]
  B, Hkv = shape["B"], shape["Hkv"]
  q = sds((B, T, G * Hkv, D), q_dtype)
  if op == "unique_attention":
    pages = sds((shape["P"], shape["page_size"], Hkv, D), kv_dtype)
    return (q, pages, pages, sds((B, shape["max_pages"]), jnp.int32), sds((B,), jnp.int32)), {}
  if op == "chunk_scores":
    # Packed 4-bit codes with per-key scales, or 8-bit codes with per-chunk scales (routing's
    # layouts: the kernel multiplies per key only in the first).
    width, rows = (D // 2, shape["S"]) if shape["bits"] == 4 else (D, -(-shape["S"] // shape["C"]))
    codes, scale = sds((shape["S"], Hkv, width), jnp.int8), sds((rows, Hkv), jnp.float32)
    return (q, codes, scale), {"chunk_size": shape["C"], "int8": bool(shape["int8"])}
  kv = sds((shape["S"], Hkv, D), kv_dtype)
  if op == "shared_attention":
    return (q, kv, kv), {}
  top_k = min(3, -(-shape["S"] // shape["C"]))
  return (q, kv, kv, sds((B, Hkv, top_k), jnp.int32)), {"chunk_size": shape["C"]}


def _mosaic_calls(lowered) -> list[tuple[str, dict]]:
  """(kernel name, backend config) of each Mosaic TPU custom call of the module."""
  calls = re.findall(r'custom_call @tpu_custom_call\(.*backend_config = "([^"]*)".*'
                     r'kernel_name = "(\w+)"', lowered.as_text())
  return [(name, json.loads(config.replace("\\22", '"').replace("\\0A", "\n")))
          for config, name in calls]


def _check_cost(op: str, args: tuple, static: dict, cost: dict):
  """The kernel's cost estimate for XLA covers the op's real work (query rows x the keys each
  reads: the whole shared S, a request's table capacity, its chunks; padding only adds) and
  its K/V bytes, at most 64x over: two products of D per pair and an exp each (chunk scores:
  products only)."""
  q = args[0]
  B, T, Hq, D = q.shape
  if op == "shared_attention":
    keys = args[1].shape[0]
  elif op == "unique_attention":
    keys = args[3].shape[1] * args[1].shape[1]
  elif op == "chunk_attention":
    keys = args[3].shape[-1] * static["chunk_size"]
  else:
    keys = args[1].shape[0]
  pairs = B * T * Hq * keys
  if op == "chunk_scores":
    assert cost["transcendentals"] == 0 and pairs * D <= cost["flops"] <= 64 * pairs * D, cost
  else:
    assert cost["flops"] == 4 * D * cost["transcendentals"], cost
    assert pairs <= cost["transcendentals"] <= 64 * pairs, (pairs, cost)
  kv = args[1]
  assert cost["bytes_accessed"] >= math.prod(kv.shape) * jnp.dtype(kv.dtype).itemsize, cost


def _lower(op: str, args: tuple, chip, **kwargs):
  with targets.lowering_for(chip):
    fn = functools.partial(OPS[op], implementation="mosaic_tpu", **kwargs)
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))


@pytest.mark.parametrize("case", _cases())
def test_kernel_lowers_for_tpu(case):
  op = case["op"]
  args, static = _inputs(op, SHAPES[op][case["shape"]], D=case["D"], G=case["G"], T=case["T"],
                         dtype=case["dtype"])
  plan = pk.plan(op, *args, implementation="mosaic_tpu", target=case["target"], **static)
  lowered = _lower(op, args, case["target"], config=plan.config, **static)
  [(name, backend)] = _mosaic_calls(lowered)
  assert name == f"moska_{op}", plan
  _check_cost(op, args, static, backend["custom_call_config"]["cost_estimate"])


@pytest.mark.parametrize("chip", sorted(targets.TPU_PRESETS))
@pytest.mark.parametrize("op", ["shared_attention", "chunk_attention", "unique_attention"])
def test_float8_kv_lowers_on_every_chip(op, chip):
  """float8 K/V tiles (32 sublanes per native tile) with traced per-head scales."""
  args, static = _inputs(op, SHAPES[op][1], D=128, G=4, T=1, dtype="fp8")
  scale = jax.ShapeDtypeStruct((SHAPES[op][1]["Hkv"],), jnp.float32)
  plan = pk.plan(op, *args, implementation="mosaic_tpu", target=chip, k_scale=scale,
                 v_scale=scale, **static)
  with targets.lowering_for(chip):
    fn = lambda args, k_scale, v_scale: OPS[op](*args, implementation="mosaic_tpu",
                                                config=plan.config, k_scale=k_scale,
                                                v_scale=v_scale, **static)
    lowered = jax.jit(fn).trace(args, scale, scale).lower(lowering_platforms=("tpu",))
  assert [name for name, _ in _mosaic_calls(lowered)] == [f"moska_{op}"], plan


@pytest.mark.parametrize("chip", ["v4", "v5e"])
def test_a_long_prefill_chunk_lowers_in_row_tiles(chip):
  """unique_attention with a 1024-token chunk of Llama-3.1-8B heads (4096 rows per kv head): the
  default plan cuts them into row tiles (a 5-axis grid) that lower for the chip."""
  args, _ = _inputs("unique_attention", SHAPES["unique_attention"][1], D=128, G=4, T=1024,
                    dtype="bf16")
  plan = pk.plan("unique_attention", *args, implementation="mosaic_tpu", target=chip)
  assert plan.config.block_m < 4 * 1024
  lowered = _lower("unique_attention", args, chip, config=plan.config)
  assert [name for name, _ in _mosaic_calls(lowered)] == ["moska_unique_attention"], plan


def test_a_kernel_that_needs_more_vmem_asks_for_it_up_to_the_chip():
  q = jax.ShapeDtypeStruct((16, 16, 16, 256), jnp.float32)
  k = jax.ShapeDtypeStruct((4097, 1, 256), jnp.float32)
  big = pk.MosaicTpuSharedConfig(block_m=256, block_k=2048)  # ~20 MiB by tuning.vmem_bytes

  def limits(chip, config):
    [(_, backend)] = _mosaic_calls(_lower("shared_attention", (q, k, k), chip, config=config))
    return [c["size"] for c in backend.get("scoped_memory_configs", [])]

  default = pk.plan("shared_attention", q, k, k, implementation="mosaic_tpu", target="v5e")
  assert limits("v5e", default.config) == []  # fits the default scoped VMEM
  assert limits("v5e", big) == [25 * targets.MIB] and limits("v4", big) == [16 * targets.MIB]


@pytest.mark.parametrize("name", sorted(targets.TPU_PRESETS))
def test_lowering_for_names_the_chip(name):
  chip = targets.target(name)
  q = jax.ShapeDtypeStruct((1, 1, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1000, 1, 128), jnp.bfloat16)  # one kv head: v4 / v5p split S
  with targets.lowering_for(name):
    # Mosaic's lowering rules see the chip (JAX's table of it agrees with the preset) ...
    info = pltpu.get_tpu_info()
    assert (info.num_cores, info.vmem_capacity_bytes, info.mxu_column_size) == (
        chip.num_cores, chip.vmem_bytes, chip.mxu)
    # ... and so do the default tilings.
    assert targets.current("tpu") == chip
    assert pk.plan("shared_attention", q, k, k, implementation="mosaic_tpu") == pk.plan(
        "shared_attention", q, k, k, implementation="mosaic_tpu", target=chip)
  assert jax.sharding.get_abstract_mesh().empty


def test_lowering_for_keeps_the_mesh_in_scope_and_refuses_other_chips():
  mesh = jax.sharding.AbstractMesh((2,), ("x",), (jax.sharding.AxisType.Explicit,))
  with jax.sharding.use_abstract_mesh(mesh), targets.lowering_for("v6e"):
    inner = jax.sharding.get_abstract_mesh()
    assert inner.axis_names == ("x",) and inner.abstract_device.device_kind == "TPU v6e"
  with pytest.raises(ValueError, match="chip must be one of"):
    with targets.lowering_for("h100"):
      pass
