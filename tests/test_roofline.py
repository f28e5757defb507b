"""The analytic roofline model (experiments/roofline_model.py): a hand-checked step, sanity,
capacity; and the roofline experiment's main."""

import dataclasses
import math
import os

import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import run  # noqa: F401  (the launcher's flags: --experiment and the shared ones)
from experiments import hardware, roofline, roofline_model as rl
from experiments.timing import Ceilings

M = rl.ModelShape()  # Llama 3.1 8B, FP8 weights and KV
# Round numbers so the arithmetic below is checkable by hand.
ROUND = hardware.Hardware("round", hbm_bytes=1e12, hbm_bytes_per_s=1e12, matmul_flops_bf16=5e14,
                          matmul_flops_fp8=1e15, interconnect_bytes_per_s=1e11)


def _system(hw, n=1, n_u=1, n_s=1, **kw) -> rl.System:
  return rl.System(rl.Cluster(hw, n), rl.Cluster(hw, n_u), rl.Cluster(hw, n_s), **kw)


def test_hand_checked_moska_dense_step():
  # moska_dense, S = 2^20, U = 2^16, B = 8 on one "round" chip (1 TB, 1 TB/s, 1 PFLOP/s FP8):
  #   KV per token = 2 (K, V) * 32 layers * 8 kv heads * 128 * 1 B = 65,536 B = 2^16 B
  #   FLOPs per query token per key = 4 * 32 layers * 32 q heads * 128 = 524,288 = 2^19
  #   weights: 8.03e9 B / 1e12 = 8.03 ms   (FLOPs 2 * 8.03e9 * 8 = 1.28e11 -> 0.13 ms)
  #   unique:  8 * 2^16 keys * 2^16 B = 2^35 B -> 34.359738 ms   (FLOPs 2^19 * 2^19 -> 0.27 ms)
  #   shared:  read once: 2^20 * 2^16 = 2^36 B -> 68.719477 ms   (FLOPs 8 * 2^20 * 2^19 -> 4.4 ms)
  #   step = 8.03 + 34.359738 + 68.719477 = 111.109215 ms -> 8 / 0.111109215 = 72.0007 tokens/s
  #   capacity: (1e12 - 8.03e9 - 2^36) / (2^16 tokens * 2^16 B = 2^32) = 214.96 -> 214 requests
  w = rl.Workload(shared=2**20, unique=2**16)
  sys = _system(ROUND)
  st = rl.step("moska_dense", M, w, sys, 8)
  assert st.weights_s == pytest.approx(8.03e-3)
  assert st.unique_s == pytest.approx(2**35 / 1e12)
  assert st.shared_s == pytest.approx(2**36 / 1e12)
  assert st.step_s == pytest.approx(111.109215e-3)
  assert st.tokens_per_s == pytest.approx(72.0007, rel=1e-5)
  assert rl.max_batch("moska_dense", M, w, sys) == 214
  # The per-request reader reads the shared KV 8 times: 8 * 68.72 ms instead of 68.72 ms.
  assert rl.step("prefix_gemv", M, w, sys, 8).shared_s == pytest.approx(8 * 2**36 / 1e12)
  # At B = 1024 the GEMM is compute-bound: 1024 * 2^20 * 2^19 FLOPs / 1e15 = 562.95 ms.
  assert rl.shared_s(M, w, 1024, sys.colocated, "moska_dense") == pytest.approx(2**49 / 1e15)
  # Routed (per-batch): a quarter of both.
  assert rl.shared_s(M, w, 1024, sys.colocated, "moska_sparse") == pytest.approx(2**47 / 1e15)
  assert rl.shared_s(M, w, 8, sys.colocated, "moska_sparse") == pytest.approx(2**34 / 1e12)


@pytest.mark.parametrize("config", rl.CONFIGS)
def test_throughput_grows_with_batch_and_falls_with_shared_length(config):
  sys = _system(hardware.PRESETS["h200"], 16, 8, 8)
  for S in (2**20, 2**24):
    w = rl.Workload(S, routing="uniform")
    tok = [rl.step(config, M, w, sys, B).step_s for B in (1, 2, 4, 64, 1024, 4096)]
    rates = [B / t for B, t in zip((1, 2, 4, 64, 1024, 4096), tok)]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(rates, rates[1:])), rates
  for B in (1, 64, 1024):
    times = [rl.step(config, M, rl.Workload(S), sys, B).step_s for S in (2**20, 2**22, 2**24)]
    assert times == sorted(times)


def test_config_ordering_and_union():
  sys = _system(hardware.PRESETS["h100"], 8)
  w = rl.Workload(2**22)
  for B in (1, 16, 256):
    t = {c: rl.step(c, M, w, sys, B).step_s for c in rl.CONFIGS[:4]}
    assert t["prefix_gemv"] == pytest.approx(t["baseline_copies"])  # same reads, other capacity
    assert t["moska_sparse"] <= t["moska_dense"] <= t["prefix_gemv"]
  assert rl.union_fraction(w, 1000) == 0.25
  uni = dataclasses.replace(w, routing="uniform")
  assert rl.union_fraction(uni, 1) == pytest.approx(0.25)
  assert rl.union_fraction(uni, 64) == pytest.approx(1.0)


def test_capacity_limits():
  h100 = hardware.PRESETS["h100"]
  w16 = rl.Workload(2**24)  # FP8 shared KV = 1 TiB: no single H100 (or 8) holds one copy
  one = _system(h100)
  assert rl.max_batch("baseline_copies", M, w16, one) == 0
  base = rl.best_step("baseline_copies", M, w16, one)
  assert base.batch == 0 and base.tokens_per_s == 0.0
  assert math.isinf(rl.ratio(rl.step("moska_dense", M, w16, one, 1), base))
  # 1 TiB shared + 4 GiB unique + 8.03e9 B weights (7.5 GiB) vs 80e9 B (74.5 GiB)
  assert "colocated needs 1035 GiB of 75 GiB" in rl.capacity_note("baseline_copies", M, w16, one)
  # S = 1M on 16 H100s (1280 GB), weights 8.03 GB once. Copies: (68.72 + 4.29) GB per request
  # -> (1280 - 8.03) / 73.01 = 17.4 -> 17. Stored once: (1280 - 8.03 - 68.72) / 4.29 = 280.2 -> 280;
  # beyond the limit nothing runs.
  sys = _system(h100, 16, 8, 8)
  w = rl.Workload(2**20)
  assert rl.max_batch("baseline_copies", M, w, sys) == 17
  assert rl.max_batch("moska_dense", M, w, sys) == 280
  assert not rl.step("moska_dense", M, w, sys, 281).fits
  assert rl.step("moska_dense", M, w, sys, 281).tokens_per_s == 0.0
  # Disaggregated: the shared nodes hold S once; the unique nodes hold weights + B x U.
  assert rl.max_batch("moska_disagg", M, w, sys) == int((8 * 80e9 - 8.03e9) // 2**32)
  assert rl.max_batch("moska_disagg", M, w16, sys) == 0  # 1 TiB > 8 x 80 GB


def test_disaggregated_overlap_and_transfer():
  sys1 = _system(ROUND, microbatches=1, link_latency_s=0.0)
  w = rl.Workload(2**20, 2**16)
  st = rl.step("moska_disagg", M, w, sys1, 8)
  assert st.step_s == pytest.approx(st.weights_s + st.unique_s + st.shared_s + st.transfer_s)
  # q out + o back (2 * 32 heads * 128 * 2 B) + lse (32 * 4 B) per layer: 16,512 B * 32 layers.
  assert rl.transfer_bytes(M, 8) == 8 * 32 * 16512
  sys2 = dataclasses.replace(sys1, microbatches=2)
  st2 = rl.step("moska_disagg", M, w, sys2, 8)
  assert st2.step_s == pytest.approx(max(st2.weights_s + st2.unique_s, st2.shared_s,
                                         st2.transfer_s))
  assert st2.step_s < st.step_s


def test_calibrated_keeps_capacity_and_fp8_ratio():
  hw = hardware.calibrated(hardware.PRESETS["h100"], Ceilings(660e12, 3.1e12, 2.55e12))
  assert hw.hbm_bytes == 80e9 and hw.hbm_bytes_per_s == 3.1e12  # the streaming read rate
  assert hw.matmul_flops_bf16 == 660e12 and hw.matmul_flops_fp8 == pytest.approx(1320e12)
  measured = hardware.calibrated(hardware.PRESETS["h100"],
                                 Ceilings(660e12, 3.1e12, 2.55e12, 1.1e15))
  assert measured.matmul_flops_fp8 == 1.1e15


def test_main_writes_results(tmp_path):
  measured = tmp_path / "shared_attention.csv"
  measured.write_text("# ceilings: bf16 matmul 660 TFLOP/s, copy 2.55 TB/s (read+write)\n"
                      "S,B,ours_ms,paged_over_ours\n131072,512,2.0,51.3\n")
  with flagsaver.flagsaver():
    flags.FLAGS(["prog", "--experiment=roofline", f"--out_dir={tmp_path}",
                 "--roofline_shared_lengths=1048576,16777216", "--roofline_batches=1,16",
                 f"--roofline_measured_csv={measured}"])
    roofline.main()
  for name in ("roofline.csv", "roofline.md", "roofline_sweep.csv", "roofline_headline.csv",
               "roofline_check.csv", "roofline.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  md = (tmp_path / "roofline.md").read_text()
  assert "Headline comparison (S = 16777216" in md and "moska_sparse" in md
  check = (tmp_path / "roofline_check.csv").read_text()
  assert "131072,512,1.66" in check  # model: 4 * 512 * 32 * 131072 * 128 / 660e12 = 1.666 ms


def test_paper_scale_mode_equals_the_model(tmp_path):
  # A decode CSV shaped like results/paper_scale.csv (header flags, one row per impl, a "does not
  # fit" row) and a ceilings CSV shaped like results/fp8.csv.
  measured = tmp_path / "paper_scale.csv"
  measured.write_text(
      "# device: gpu:NVIDIA H200 x1\n"
      "# flags: --decode_model=llama3_1_8b --dtype=bfloat16 --decode_sparsity=0.75 "
      "--decode_reroute=8 --decode_summary=int4 --decode_chunk=2048\n"
      "impl,U,B,S,kv_dtype,layers,step_ms,x_baseline,route_ms,reuse_ms,note\n"
      "moska_dense,1024,64,1048576,float8_e4m3fn,32,150.0,12.0,nan,nan,\n"
      "moska_sparse,1024,64,1048576,float8_e4m3fn,32,90.0,20.0,150.0,80.0,\n"
      "baseline_paged,1024,64,1048576,float8_e4m3fn,32,1800.0,1.0,nan,nan,\n"
      "all,4096,256,1048576,float8_e4m3fn,32,nan,nan,nan,nan,does not fit\n")
  ceilings = tmp_path / "fp8.csv"
  ceilings.write_text("# ceilings: bf16 matmul 600 TFLOP/s, FP8 matmul 800 TFLOP/s, streaming read "
                      "4.4 TB/s, copy 3.2 TB/s (read + write)\n"
                      "op,B,fp8_x_floor\nshared_attention,8,2.5\nunique_attention,128,2.0\n")
  with flagsaver.flagsaver():
    flags.FLAGS(["prog", "--experiment=roofline", f"--out_dir={tmp_path}",
                 "--roofline_shared_lengths=1048576,16777216", "--roofline_batches=1,16",
                 f"--roofline_measured_csv={tmp_path / 'absent.csv'}",
                 f"--roofline_paper_scale_csv={measured}",
                 f"--roofline_paper_scale_ceilings_csv={ceilings}"])
    roofline.main()
  rows, _ = rl.read_measured(str(tmp_path / "roofline_paper_scale.csv"))
  assert [r["impl"] for r in rows] == ["moska_dense", "moska_sparse", "baseline_paged"]
  sparse = rows[1]
  # The model called directly: one H200 (the preset: the CSV recorded no ceilings), bf16 weights,
  # FP8 K/V, per-request routing; the router once per 8 steps.
  m = rl.ModelShape(weight_bytes=2, kv_bytes=1)
  w = rl.Workload(2**20, 1024, 0.75, routing="uniform")
  chip = rl.Cluster(hardware.PRESETS["h200"], 1)
  sys = rl.System(chip, chip, chip)
  st = rl.step("moska_sparse", m, w, sys, 64)
  router = rl.router_s(m, w, 64, chip, 8)
  base = rl.step("prefix_gemv", m, w, sys, 64)
  assert router > 0
  # A sketch of half the dimensions in 8-bit codes: the same code bytes without the per-key
  # scale (64 of 68 bytes per key and kv head at D=128, when the bytes bind at B=1), half the
  # products (half the time when the products do).
  for batch, ratio in ((1, 64 / 68), (1 << 16, 0.5)):
    assert rl.router_s(m, w, batch, chip, 8, "int8-pca2") == pytest.approx(
        ratio * rl.router_s(m, w, batch, chip, 8), rel=1e-6)
  assert float(sparse["model_ms"]) == pytest.approx((st.step_s + router) * 1e3, rel=1e-6)
  assert float(sparse["model_shared_ms"]) == pytest.approx(st.shared_s * 1e3, rel=1e-6)
  assert float(sparse["model_router_ms"]) == pytest.approx(router * 1e3, rel=1e-6)
  assert float(sparse["model_x_baseline"]) == pytest.approx(base.step_s / (st.step_s + router),
                                                            rel=1e-6)
  assert float(sparse["measured_over_model"]) == pytest.approx(90.0 / ((st.step_s + router) * 1e3),
                                                               rel=1e-6)
  assert float(sparse["measured_router_ms"]) == pytest.approx((150.0 - 80.0) / 8)
  # The second model: the recorded ceilings, every matmul at the bf16 rate.
  cal = rl.Cluster(dataclasses.replace(hardware.PRESETS["h200"], hbm_bytes_per_s=4.4e12,
                                       matmul_flops_bf16=600e12, matmul_flops_fp8=600e12), 1)
  st_c = rl.step("moska_sparse", m, w, rl.System(cal, cal, cal), 64)
  assert float(sparse["cal_ms"]) == pytest.approx(
      (st_c.step_s + rl.router_s(m, w, 64, cal, 8)) * 1e3, rel=1e-6)
  md = (tmp_path / "roofline_paper_scale.md").read_text()
  assert "H200 SXM preset" in md and "538.7x" in md and "2.5x its floor" in md


def test_decode_step_rejects_what_it_cannot_price():
  row = dict(impl="moska_dense", U="1024", B="8", S="4096", kv_dtype="float8_e4m3fn", layers="2")
  header = {"flags": "--decode_model=llama3_1_8b --dtype=bfloat16 --decode_sparsity=0.75 "
                     "--decode_reroute=4 --decode_summary=mean"}
  with pytest.raises(ValueError, match="decode_summary must be a sketch kind"):
    rl.decode_step("moska_dense", row, header, hardware.PRESETS["h200"])
  with pytest.raises(ValueError, match=r"flags \['decode_reroute'\] missing"):
    rl.decode_step("moska_dense", row, {"flags": header["flags"].replace("--decode_reroute=4", "")},
                   hardware.PRESETS["h200"])
  with pytest.raises(ValueError, match="impl must be one of"):
    rl.decode_step("all", row, header, hardware.PRESETS["h200"])
