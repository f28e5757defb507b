"""The analytic roofline model of a MoSKA decode step and its baselines (pure Python, no JAX).

Every part of a step costs max(bytes / HBM bandwidth, FLOPs / matmul rate) on the chips that run it
(ideal scaling over chips); the parts run one after another on one chip group. Configs:

  baseline_copies  no sharing: each request holds and reads its own copy of the shared KV, so one
                   request needs (S + U) KV + weights; the batch is capacity-limited (may be 0).
  prefix_gemv      prefix caching (vLLM / SGLang): the shared KV is stored once but each request's
                   decode kernel re-reads it (B memory-bound GEMVs; 0.5-GB shared KV >> L2, and
                   the measured paged baseline of results/shared_attention.md scales as B x the
                   KV read).
  moska_dense      Shared KV Attention: all queries as one GEMM over the shared KV, read once.
  moska_sparse     routed chunks: 1 - sparsity of the FLOPs (25% at 0.75); the bytes are the union
                   of the chunks chosen across the batch: routing "batch" (one routing decision
                   per batch: 1 - sparsity of the bytes) or "uniform" (independent per request:
                   1 - sparsity^B, ~all bytes).
  moska_disagg     moska_sparse with the shared KV on separate shared nodes; unique nodes hold the
                   weights and unique KV. q goes out and (o, lse) come back every layer.

The unique part (B x U, always bandwidth-bound) and a weight read per step are in every config.
`check_rows` sets the model against measured shared-attention times (the shared_attention
experiment's CSV), `decode_rows` against measured end-to-end decode steps (the decode experiment's
CSV) at their own configurations, with the sparse router priced by `router_s`. The experiment
around it is `experiments.roofline`; the tests call this module.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re

from experiments.hardware import Hardware
from moska_jax.config import SKETCHES, sketch_width

GiB = 2**30

CONFIGS = ("baseline_copies", "prefix_gemv", "moska_dense", "moska_sparse", "moska_disagg")
BASELINES = ("baseline_copies", "prefix_gemv")


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """Decoder shape and storage widths. Defaults: Llama 3.1 8B with FP8 weights and FP8 KV."""

  layers: int = 32
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  params: float = 8.03e9
  weight_bytes: int = 1
  kv_bytes: int = 1
  act_bytes: int = 2  # q and o crossing the interconnect (bf16)

  @property
  def kv_bytes_per_token(self) -> float:
    """K and V of one token, all layers (FP8 Llama 3.1 8B: 64 KiB)."""
    return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes

  @property
  def attn_flops_per_key(self) -> float:
    """FLOPs one query token spends on one key, all layers: q.k and p.v, 2 FLOPs per MAC each."""
    return 4 * self.layers * self.q_heads * self.head_dim

  @property
  def weight_bytes_total(self) -> float:
    return self.params * self.weight_bytes


@dataclasses.dataclass(frozen=True)
class Workload:
  """One shared context, its requests' unique contexts, and the routing of the sparse configs."""

  shared: int
  unique: int = 65536
  sparsity: float = 0.75  # of the shared part, routed configs only
  unique_sparsity: float = 0.0  # also route the unique part (routed configs only; an assumption)
  routing: str = "batch"  # "batch": one decision per step; "uniform": independent per request


@dataclasses.dataclass(frozen=True)
class Cluster:
  """`devices` chips of one kind, modelled as one chip with n times the capacity and rates."""

  hw: Hardware
  devices: int

  @property
  def hbm_bytes(self) -> float:
    return self.hw.hbm_bytes * self.devices

  @property
  def bytes_per_s(self) -> float:
    return self.hw.hbm_bytes_per_s * self.devices

  def flops(self, element_bytes: int) -> float:
    return self.hw.matmul_flops(element_bytes) * self.devices

  @property
  def link_bytes_per_s(self) -> float:
    return (self.hw.interconnect_bytes_per_s or math.inf) * self.devices


@dataclasses.dataclass(frozen=True)
class System:
  """Colocated chips (configs 1-4) and the disaggregated unique / shared node groups (config 5).

  microbatches: the disaggregated step runs this many slices of the batch in ping-pong, so unique
  nodes, shared nodes and links work at once and the step costs microbatches x the slowest stage
  (each stage priced at B / microbatches). With 1 the stages run back to back (their sum): layer
  l's shared attention needs layer l's q, and layer l + 1 needs the merged o, so one batch alone
  cannot overlap them.
  """

  colocated: Cluster
  unique: Cluster
  shared: Cluster
  link_latency_s: float = 5e-6
  microbatches: int = 2


@dataclasses.dataclass(frozen=True)
class Step:
  """Seconds per decode step of `batch` requests (one token each), by part."""

  config: str
  batch: int
  weights_s: float
  unique_s: float
  shared_s: float
  transfer_s: float
  step_s: float
  fits: bool

  @property
  def tokens_per_s(self) -> float:
    return self.batch / self.step_s if self.batch and self.fits else 0.0


def roofline_s(n_bytes: float, flops: float, cluster: Cluster, element_bytes: int) -> float:
  """One part on one cluster: max(bytes / bandwidth, FLOPs / matmul rate at that width)."""
  return max(n_bytes / cluster.bytes_per_s, flops / cluster.flops(element_bytes))


def union_fraction(work: Workload, batch: float) -> float:
  """Fraction of the shared chunks selected by at least one request of the batch.

  batch routing: everyone uses the same 1 - sparsity of the chunks. uniform: each request picks
  its own 1 - sparsity independently, so a chunk is missed by all B with probability sparsity^B.
  """
  keep = 1.0 - work.sparsity
  if work.routing == "batch":
    return keep
  if work.routing == "uniform":
    return 1.0 - work.sparsity ** max(batch, 1.0)
  raise ValueError(f"unknown routing {work.routing!r}")


def weights_s(m: ModelShape, batch: float, c: Cluster) -> float:
  """All weights read once per step; 2 FLOPs per parameter per token."""
  return roofline_s(m.weight_bytes_total, 2 * m.params * batch, c, m.weight_bytes)


def unique_s(m: ModelShape, w: Workload, batch: float, c: Cluster, routed: bool) -> float:
  """Each request reads its own U tokens of KV (intensity 2G / kv_bytes: always bandwidth-bound)."""
  keep = 1.0 - w.unique_sparsity if routed else 1.0
  keys = batch * w.unique * keep
  return roofline_s(keys * m.kv_bytes_per_token, keys * m.attn_flops_per_key, c, m.kv_bytes)


def shared_s(m: ModelShape, w: Workload, batch: float, c: Cluster, config: str) -> float:
  """The shared part: read per request (baselines), once (dense GEMM) or the routed union."""
  kv = w.shared * m.kv_bytes_per_token
  flops = batch * w.shared * m.attn_flops_per_key
  if config in BASELINES:
    n_bytes = batch * kv
  elif config == "moska_dense":
    n_bytes = kv
  else:
    n_bytes = union_fraction(w, batch) * kv
    flops *= 1.0 - w.sparsity
  return roofline_s(n_bytes, flops, c, m.kv_bytes)


def transfer_bytes(m: ModelShape, batch: float) -> float:
  """Per step: every layer sends each request's q and returns its o (bf16) and lse (f32)."""
  return batch * m.layers * m.q_heads * (2 * m.head_dim * m.act_bytes + 4)


def transfer_s(m: ModelShape, batch: float, sys: System) -> float:
  """q/o/lse over the links (the smaller side's aggregate bandwidth) + 2 latencies per layer."""
  bw = min(sys.unique.link_bytes_per_s, sys.shared.link_bytes_per_s)
  return transfer_bytes(m, batch) / bw + 2 * m.layers * sys.link_latency_s


def memory(config: str, m: ModelShape, w: Workload) -> dict[str, tuple[float, float]]:
  """Bytes each chip group must hold, as (fixed, per request) per group."""
  kv_s, kv_u = w.shared * m.kv_bytes_per_token, w.unique * m.kv_bytes_per_token
  W = m.weight_bytes_total
  if config == "baseline_copies":
    return {"colocated": (W, kv_s + kv_u)}
  if config == "moska_disagg":
    return {"unique": (W, kv_u), "shared": (kv_s, 0.0)}
  return {"colocated": (W + kv_s, kv_u)}


def max_batch(config: str, m: ModelShape, w: Workload, sys: System, cap: int = 1 << 20) -> int:
  """Largest B whose KV and weights fit every group's HBM (0: not even one request fits)."""
  best = cap
  for group, (fixed, per_req) in memory(config, m, w).items():
    hbm = getattr(sys, group).hbm_bytes
    if fixed > hbm:
      return 0
    if per_req:
      best = min(best, int((hbm - fixed) // per_req))
  return best


def capacity_note(config: str, m: ModelShape, w: Workload, sys: System) -> str:
  """Bytes one request needs in each group vs what the group holds, in GiB."""
  return "; ".join(f"{g} needs {(f + p) / GiB:.0f} GiB of {getattr(sys, g).hbm_bytes / GiB:.0f} GiB"
                   for g, (f, p) in memory(config, m, w).items())


def step(config: str, m: ModelShape, w: Workload, sys: System, batch: int) -> Step:
  """Cost of one decode step of `batch` requests in `config`."""
  fits = 0 < batch <= max_batch(config, m, w, sys)
  if config != "moska_disagg":
    c = sys.colocated
    parts = (weights_s(m, batch, c), unique_s(m, w, batch, c, routed=config == "moska_sparse"),
             shared_s(m, w, batch, c, config), 0.0)
    return Step(config, batch, *parts, sum(parts), fits)
  mb = max(1, min(sys.microbatches, batch))
  b = batch / mb
  parts = tuple(mb * t for t in (weights_s(m, b, sys.unique), unique_s(m, w, b, sys.unique, True),
                                 shared_s(m, w, b, sys.shared, config), transfer_s(m, b, sys)))
  stages = (parts[0] + parts[1], parts[2], parts[3])  # unique nodes, shared nodes, links
  return Step(config, batch, *parts, sum(stages) if mb == 1 else max(stages), fits)


def best_step(config: str, m: ModelShape, w: Workload, sys: System) -> Step:
  """The step at the largest batch that fits: throughput never falls with B in this model
  (every part is c + d*B or max(c, d*B), so B / step grows), so that batch is the best one."""
  return step(config, m, w, sys, max_batch(config, m, w, sys))


def ratio(a: Step, b: Step) -> float:
  """Throughput of a over b; inf when b cannot run (batch 0)."""
  return a.tokens_per_s / b.tokens_per_s if b.tokens_per_s else math.inf


def with_shared_chips(sys: System, n: int) -> System:
  return dataclasses.replace(sys, shared=Cluster(sys.shared.hw, n))


def shared_nodes_to_balance(m: ModelShape, w: Workload, sys: System) -> int:
  """Fewest shared chips that hold the shared KV and keep the shared stage from being the slowest.

  The shared stage scales as 1 / chips, so one evaluation on one chip gives the answer; used for
  the "shared nodes added on top of the baseline's chips" reading of disaggregation.
  """
  big = best_step("moska_disagg", m, w, with_shared_chips(sys, 10**6))
  one = step("moska_disagg", m, w, with_shared_chips(sys, 1), big.batch)
  other = max(big.weights_s + big.unique_s, big.transfer_s)
  need_cap = math.ceil(w.shared * m.kv_bytes_per_token / sys.shared.hw.hbm_bytes)
  return max(need_cap, math.ceil(one.shared_s / other))


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One row of the headline ladder: a MoSKA config and a baseline under stated assumptions."""

  key: str  # names the row whatever its label says
  label: str
  moska: str
  baseline: str = "baseline_copies"
  m_moska: ModelShape | None = None
  m_baseline: ModelShape | None = None
  work: dict | None = None  # Workload overrides for MoSKA
  sys_moska: System | None = None
  in_main_table: bool = False


LADDER_BASE = "routed"  # the key of the ladder row the others are set against


def ladder(m: ModelShape, w: Workload, sys: System) -> list[Scenario]:
  """Assumption sets for the headline comparison at one S, from our defaults towards the paper's.

  Each scenario states what it adds; the ratio is MoSKA's tokens/s over the baseline's, each at its
  best batch. "shared nodes extra": the baseline runs on as many chips as MoSKA's unique nodes and
  the shared nodes come on top (as many as keep them off the critical path), one reading of
  "independent scaling"; its per-chip ratio is also reported.
  """
  bf16 = dataclasses.replace(m, weight_bytes=2, kv_bytes=2)
  routed_u = {"unique_sparsity": 0.75}
  extra = dataclasses.replace(sys, unique=sys.colocated)
  extra_u = with_shared_chips(
      extra, shared_nodes_to_balance(m, dataclasses.replace(w, **routed_u), extra))
  extra = with_shared_chips(extra, shared_nodes_to_balance(m, w, extra))
  kept = f"{100 * (1 - w.sparsity):.3g}%"
  return [
      Scenario("dense", "dense GEMM over the shared KV, equal chips", "moska_dense",
               in_main_table=True),
      Scenario(LADDER_BASE, f"routed {kept} of the shared KV (per-batch routing), equal chips",
               "moska_sparse", work={"routing": "batch"}, in_main_table=True),
      Scenario("routed_uniform",
               "routed, uniform per-request routing (union ~ all bytes), equal chips",
               "moska_sparse", work={"routing": "uniform"}),
      Scenario("disagg", "disaggregated, unique + shared nodes = the baseline's chips",
               "moska_disagg", in_main_table=True),
      Scenario("routed_unique", "routed + unique part routed at 75% too", "moska_sparse",
               work=routed_u),
      Scenario("routed_bf16_baseline", "routed + baseline in BF16 (weights, KV), MoSKA FP8",
               "moska_sparse", m_baseline=bf16),
      Scenario("routed_unique_bf16_baseline", "routed + unique routed + baseline BF16",
               "moska_sparse", work=routed_u, m_baseline=bf16),
      Scenario("disagg_extra", f"disaggregated, shared nodes extra ({extra.shared.devices} chips)",
               "moska_disagg", sys_moska=extra),
      Scenario("disagg_extra_bf16_baseline",
               f"disaggregated, shared nodes extra ({extra.shared.devices}) + baseline BF16",
               "moska_disagg", sys_moska=extra, m_baseline=bf16),
      Scenario("disagg_extra_unique",
               f"disaggregated, shared nodes extra ({extra_u.shared.devices}) + unique routed",
               "moska_disagg", sys_moska=extra_u, work=routed_u),
  ]


def evaluate_scenario(sc: Scenario, m: ModelShape, w: Workload, sys: System) -> dict:
  """The ladder row: both configs at their best batch, the ratio and the per-chip ratio."""
  sys_m = sc.sys_moska or sys
  mo = best_step(sc.moska, sc.m_moska or m, dataclasses.replace(w, **(sc.work or {})), sys_m)
  ba = best_step(sc.baseline, sc.m_baseline or m, w, sys)
  chips_m = (sys_m.unique.devices + sys_m.shared.devices if sc.moska == "moska_disagg"
             else sys_m.colocated.devices)
  r = ratio(mo, ba)
  return dict(S=w.shared, key=sc.key, scenario=sc.label, moska=sc.moska, baseline=sc.baseline,
              moska_batch=mo.batch, baseline_batch=ba.batch, moska_tok_s=mo.tokens_per_s,
              baseline_tok_s=ba.tokens_per_s, ratio=r,
              ratio_per_chip=r * sys.colocated.devices / chips_m,
              in_main_table="yes" if sc.in_main_table else "no")


# Check against measured kernel times (one layer, the shared_attention experiment's CSV).


def read_measured(path: str) -> tuple[list[dict], dict[str, str]]:
  """Rows and '# key: value' header of an experiments.report CSV."""
  header, lines = {}, []
  with open(path) as f:
    for line in f:
      if line.startswith("# ") and ":" in line:
        key, val = line[2:].split(":", 1)
        header[key.strip()] = val.strip()
      elif line.strip():
        lines.append(line)
  return list(csv.DictReader(lines)), header


def measured_hardware(header: dict[str, str], hw: Hardware) -> Hardware | None:
  """hw with the ceilings a results header recorded (None if it recorded none): its read
  bandwidth and its bf16 matmul rate, also for 8-bit operands, since our kernels spend a bf16
  product's tensor-core time on each FP8 K/V product (QK^T as two float8 query terms, PV on V
  widened to float16). Capacity and interconnect stay hw's."""
  ceilings = header.get("ceilings", "")
  matmul = re.search(r"bf16 matmul ([\d.]+) TFLOP/s", ceilings)
  # The streaming read rate where the run measured one; older runs recorded only a copy rate.
  bandwidth = (re.search(r"streaming read ([\d.]+) TB/s", ceilings)
               or re.search(r"copy ([\d.]+) TB/s", ceilings))
  if not (matmul and bandwidth):
    return None
  return dataclasses.replace(hw, name="ceilings of the measured run",
                             matmul_flops_bf16=float(matmul[1]) * 1e12,
                             matmul_flops_fp8=float(matmul[1]) * 1e12,
                             hbm_bytes_per_s=float(bandwidth[1]) * 1e12)


def check_rows(rows: list[dict], header: dict[str, str], hw: Hardware,
               column: str) -> tuple[list[dict], str]:
  """Model vs measured for one layer of shared attention (our GEMM kernel and, if timed, the
  per-request paged baseline = prefix_gemv's shared part). Uses the ceilings measured in the
  same run when the CSV's header has them, else `hw`."""
  m = ModelShape(layers=1, kv_bytes=4 if "--dtype=float32" in header.get("command", "") else 2)
  hw = measured_hardware(header, hw) or hw
  chip = Cluster(hw, 1)
  out = []
  for r in rows:
    if column not in r or not r.get("B") or not r.get("S"):
      continue
    B, S, ms = int(r["B"]), int(r["S"]), float(r[column])
    w = Workload(S, unique=0)
    pred = 1e3 * shared_s(m, w, B, chip, "moska_dense")
    row = dict(S=S, B=B, model_ms=pred, measured_ms=ms, rel_err=(ms - pred) / pred)
    paged = float(r.get("paged_over_ours") or "nan") * ms
    if math.isfinite(paged):
      pred_p = 1e3 * shared_s(m, w, B, chip, "prefix_gemv")
      row.update(model_gemv_ms=pred_p, measured_paged_ms=paged,
                 rel_err_gemv=(paged - pred_p) / pred_p)
    out.append(row)
  return out, hw.name


# Model vs a measured end-to-end decode step (the decode experiment's CSV, e.g. paper_scale.csv).

DECODE_CONFIGS = {"moska_dense": "moska_dense", "moska_sparse": "moska_sparse",
                  "baseline_paged": "prefix_gemv"}  # measured impl -> the config that models it
_WIDTHS = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def router_s(m: ModelShape, w: Workload, batch: float, c: Cluster, reroute_every: int,
             summary: str = "int4") -> float:
  """The sketch router per step (`summary`, one of `config.SKETCHES`): every shared key's sketch
  (W codes of its bits per kv head, and an f32 scale per key for 4-bit codes, per chunk for
  8-bit ones -- negligible, W = `config.sketch_width`) is read once per
  routing, and every query row is scored against every key over W dimensions (q.k over all D
  is half the attention FLOPs) on the 8-bit units; one routing serves reroute_every steps.
  (`step` leaves the router out; the headline assumes a per-chunk summary.)"""
  bits = SKETCHES[summary][0]
  width = sketch_width(summary, m.head_dim)
  n_bytes = w.shared * m.layers * m.kv_heads * (width * bits / 8 + (4 if bits == 4 else 0))
  flops = batch * w.shared * m.attn_flops_per_key / 2 * width / m.head_dim
  return roofline_s(n_bytes, flops, c, 1) / reroute_every


def _decode_flags(header: dict[str, str]) -> dict[str, str]:
  """The --name=value flags of a decode results header; ValueError if the model cannot price it."""
  got = dict(re.findall(r"--(\w+)=(\S+)", header.get("flags", "")))
  need = ("decode_model", "dtype", "decode_sparsity", "decode_reroute", "decode_summary")
  missing = [k for k in need if k not in got]
  if missing:
    raise ValueError(f"decode header: flags {missing} missing from {header.get('flags')!r}")
  if got["decode_model"] != "llama3_1_8b":
    raise ValueError(f"decode header: decode_model must be llama3_1_8b (ModelShape's shape), got "
                     f"{got['decode_model']!r}")
  if got["decode_summary"] not in SKETCHES:
    raise ValueError(f"decode header: decode_summary must be a sketch kind {sorted(SKETCHES)} "
                     f"(what router_s prices), got {got['decode_summary']!r}")
  if got["dtype"] not in _WIDTHS:
    raise ValueError(f"decode header: dtype must be one of {sorted(_WIDTHS)}, got {got['dtype']!r}")
  return got


def decode_step(impl: str, row: dict, header: dict[str, str],
                hw: Hardware) -> tuple[Step, float]:
  """The model of one measured decode row on one chip: its step and the router's share (s).

  The workload is the row's (S, U, B, layers, K/V width) and the header's (weights width,
  sparsity, re-routing); routing is "uniform" (each request routes itself, so the chunks read are
  the union over the batch). The modelled step time is step.step_s + router.
  """
  if impl not in DECODE_CONFIGS:
    raise ValueError(f"decode_step: impl must be one of {sorted(DECODE_CONFIGS)}, got {impl!r}")
  f = _decode_flags(header)
  if row["kv_dtype"] not in _WIDTHS:
    raise ValueError(f"decode_step: kv_dtype must be one of {sorted(_WIDTHS)}, got "
                     f"{row['kv_dtype']!r}")
  m = ModelShape(layers=int(row["layers"]), weight_bytes=_WIDTHS[f["dtype"]],
                 kv_bytes=_WIDTHS[row["kv_dtype"]])
  w = Workload(int(row["S"]), int(row["U"]), float(f["decode_sparsity"]), routing="uniform")
  chip = Cluster(hw, 1)
  B, config = int(row["B"]), DECODE_CONFIGS[impl]
  st = step(config, m, w, System(chip, chip, chip), B)
  router = (router_s(m, w, B, chip, int(f["decode_reroute"]), f["decode_summary"])
            if config == "moska_sparse" else 0.0)
  return st, router


def decode_rows(rows: list[dict], header: dict[str, str], hw: Hardware,
                prefix: str = "model") -> list[dict]:
  """Model vs measured for each measured (impl, U, B) row (rows of other impls, e.g. a "does not
  fit" row, are skipped): the modelled step and its parts in ms, measured / model, the
  modelled x_baseline (the baseline_paged config at the same U and B over this one) and the
  measured router share of a sparse step ((route_ms - reuse_ms) / decode_reroute; nan else)."""
  out = []
  for r in rows:
    if r["impl"] not in DECODE_CONFIGS:
      continue
    st, router = decode_step(r["impl"], r, header, hw)
    base, _ = decode_step("baseline_paged", r, header, hw)
    model_s = st.step_s + router
    # A routing step minus a reuse step, spread over the steps one routing serves.
    every = int(_decode_flags(header)["decode_reroute"])
    routed = (float(r.get("route_ms") or "nan") - float(r.get("reuse_ms") or "nan")) / every
    out.append({
        "impl": r["impl"], "U": int(r["U"]), "B": int(r["B"]),
        "measured_ms": float(r["step_ms"]), "measured_router_ms": routed,
        f"{prefix}_ms": model_s * 1e3,
        f"measured_over_{prefix}": float(r["step_ms"]) / (model_s * 1e3),
        "measured_x_baseline": float(r["x_baseline"]),
        f"{prefix}_x_baseline": base.step_s / model_s,
        f"{prefix}_fits": st.fits,
        **{f"{prefix}_{part}_ms": t * 1e3 for part, t in (
            ("weights", st.weights_s), ("shared", st.shared_s), ("unique", st.unique_s),
            ("router", router))}})
  return out
