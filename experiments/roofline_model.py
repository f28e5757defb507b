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
  moska_sparse     routed chunks: 25% of the FLOPs; the bytes are the union of the chunks chosen
                   across the batch: routing "batch" (one routing decision per batch: 25% of the
                   bytes) or "uniform" (independent per request: 1 - 0.75^B, ~all bytes).
  moska_disagg     moska_sparse with the shared KV on separate shared nodes; unique nodes hold the
                   weights and unique KV. q goes out and (o, lse) come back every layer.

The unique part (B x U, always bandwidth-bound) and a weight read per step are in every config.
`check_rows` sets the model against measured shared-attention times (the shared_attention
experiment's CSV). The experiment around it is `experiments.roofline`; the tests call this module.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re

from experiments.hardware import Hardware

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

  label: str
  moska: str
  baseline: str = "baseline_copies"
  m_moska: ModelShape | None = None
  m_baseline: ModelShape | None = None
  work: dict | None = None  # Workload overrides for MoSKA
  sys_moska: System | None = None
  in_main_table: bool = False


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
  return [
      Scenario("dense GEMM over the shared KV, equal chips", "moska_dense", in_main_table=True),
      Scenario("routed 25% of the shared KV (per-batch routing), equal chips", "moska_sparse",
               work={"routing": "batch"}, in_main_table=True),
      Scenario("routed, uniform per-request routing (union ~ all bytes), equal chips",
               "moska_sparse", work={"routing": "uniform"}),
      Scenario("disaggregated, unique + shared nodes = the baseline's chips", "moska_disagg",
               in_main_table=True),
      Scenario("routed + unique part routed at 75% too", "moska_sparse", work=routed_u),
      Scenario("routed + baseline in BF16 (weights, KV), MoSKA FP8", "moska_sparse",
               m_baseline=bf16),
      Scenario("routed + unique routed + baseline BF16", "moska_sparse", work=routed_u,
               m_baseline=bf16),
      Scenario(f"disaggregated, shared nodes extra ({extra.shared.devices} chips)", "moska_disagg",
               sys_moska=extra),
      Scenario(f"disaggregated, shared nodes extra ({extra.shared.devices}) + baseline BF16",
               "moska_disagg", sys_moska=extra, m_baseline=bf16),
      Scenario(f"disaggregated, shared nodes extra ({extra_u.shared.devices}) + unique routed",
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
  return dict(S=w.shared, scenario=sc.label, moska=sc.moska, baseline=sc.baseline,
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


def check_rows(rows: list[dict], header: dict[str, str], hw: Hardware,
               column: str) -> tuple[list[dict], str]:
  """Model vs measured for one layer of shared attention (our GEMM kernel and, if timed, the
  per-request paged baseline = prefix_gemv's shared part). Uses the ceilings measured in the
  same run when the CSV's header has them, else `hw`."""
  m = ModelShape(layers=1, kv_bytes=4 if "--dtype=float32" in header.get("command", "") else 2)
  ceilings = header.get("ceilings", "")
  matmul = re.search(r"bf16 matmul ([\d.]+) TFLOP/s", ceilings)
  # The streaming read rate where the run measured one; older runs recorded only a copy rate.
  bandwidth = (re.search(r"streaming read ([\d.]+) TB/s", ceilings)
               or re.search(r"copy ([\d.]+) TB/s", ceilings))
  if matmul and bandwidth:
    hw = dataclasses.replace(hw, name="ceilings of the measured run",
                             matmul_flops_bf16=float(matmul[1]) * 1e12,
                             matmul_flops_fp8=float(matmul[1]) * 1e12,
                             hbm_bytes_per_s=float(bandwidth[1]) * 1e12)
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
