"""The goals each experiment is measured against, as data; `report` marks them met or missed.

A goal names a column of one results table, the rows it applies to, a comparison and a threshold.
`GOALS` maps a table's goal key (by default its base name, e.g. "sparse_attention" for
`sparse_attention_int4.md` too) to its goals. Changing a goal is an edit here, not in a benchmark.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
           "==": operator.eq}


@dataclasses.dataclass(frozen=True)
class Goal:
  """`column op threshold` on the rows matching `where`.

  where: column -> value (equal) or (op, value), e.g. {"regime": "uniform", "n_shared": (">", 1)}.
  over: "each": every matching row must meet it (the worst is reported); "any": one must (the
    best is reported), e.g. "with the best routing".
  """

  description: str
  column: str
  op: str
  threshold: float
  where: dict[str, Any] = dataclasses.field(default_factory=dict)
  over: str = "each"

  def __post_init__(self):
    if self.op not in COMPARE or self.over not in ("each", "any"):
      raise ValueError(f"goal {self.description!r}: op must be one of {sorted(COMPARE)} and over "
                       f"'each' or 'any', got {self.op!r}, {self.over!r}")

  def matches(self, row: dict) -> bool:
    """Whether the goal applies to this row."""
    for col, want in self.where.items():
      op, value = want if isinstance(want, tuple) else ("==", want)
      if col not in row or not COMPARE[op](row[col], value):
        return False
    return True

  def met_by(self, value: float) -> bool:
    return COMPARE[self.op](value, self.threshold)


# Rows of operating points whose accuracy over dense on the trained model is measured >= 0.99.
_ACCURATE = {"acc_over_dense": (">=", 0.99)}

GOALS: dict[str, tuple[Goal, ...]] = {
    "shared_attention": (
        Goal("time over the roofline floor, every (S, B)", "ours_x_floor", "<=", 1.25),
        Goal("cuDNN time over ours (never slower), every (S, B)", "cudnn_over_ours", ">=", 1.0),
        Goal("per-request paged decode time over ours at B=512", "paged_over_ours", ">=", 50,
             where={"B": 512}),
    ),
    "unique_attention": (
        Goal("fraction of the copy bandwidth at B=64, L=64K", "ours_frac_copy", ">=", 0.8,
             where={"B": 64, "L": 65536}),
        Goal("fraction of the copy bandwidth at B=1, L=64K", "ours_frac_copy", ">=", 0.6,
             where={"B": 1, "L": 65536}),
    ),
    "sparse_attention": (
        # The best operating point (any scorer, reuse, batch-aware or not) must reach it, among
        # those whose accuracy on the trained model was measured at >= 0.99 of dense (a row
        # without a measured accuracy, NaN, is not an operating point the goal accepts).
        Goal("(router / r + routed attention) / dense, correlated, B=128, 75% sparse, "
             "accurate routing", "total_over_dense", "<=", 0.35,
             where={"regime": "correlated", "B": 128, "sparsity": 0.75, **_ACCURATE},
             over="any"),
        Goal("(router / r + routed attention) / dense, correlated, B=128, 90% sparse, "
             "accurate routing", "total_over_dense", "<=", 0.20,
             where={"regime": "correlated", "B": 128, "sparsity": 0.9, **_ACCURATE}, over="any"),
        Goal("(router / r + routed attention) / dense, correlated, B=8, 75% sparse, "
             "accurate routing", "total_over_dense", "<=", 0.40,
             where={"regime": "correlated", "B": 8, "sparsity": 0.75, **_ACCURATE}, over="any"),
        Goal("per-pair chunk_attention over its floor, uniform routing, every B",
             "chunk_x_floor", "<=", 1.25, where={"regime": "uniform", "batch_aware": 0}),
        Goal("accuracy over dense of the operating points measured on the trained model",
             "acc_over_dense", ">=", 0.99, where={"sparsity": 0.75}, over="any"),
    ),
    "fp8": (
        Goal("shared attention with FP8 K/V over its floor, every B", "fp8_x_floor", "<=", 1.25,
             where={"op": "shared_attention"}),
        Goal("shared attention: bf16 K/V time over FP8 K/V time at B <= 32", "fp8_speedup",
             ">=", 1.8, where={"op": "shared_attention", "B": ("<=", 32)}),
    ),
    "decode": (
        Goal("MoSKA dense speedup over per-request paged decode at B=64", "x_baseline", ">=", 20,
             where={"impl": "moska_dense", "B": 64}),
    ),
    "paper_scale": (
        Goal("MoSKA dense over per-request paged decode, B=256, U=1K", "x_baseline", ">=", 20,
             where={"impl": "moska_dense", "B": 256, "U": 1024}),
        Goal("MoSKA sparse over per-request paged decode, B=256, U=1K", "x_baseline", ">=", 60,
             where={"impl": "moska_sparse", "B": 256, "U": 1024}),
    ),
    "serving": (
        Goal("decoding ITL beside a 4K-token prefill over ITL without, at a prefill budget "
             "measured (the budget trades it for the long prompt's TTFT)", "itl_growth", "<=",
             1.3, where={"scenario": "prefill beside decode", "long_prompt": (">=", 4096)},
             over="any"),
        Goal("streaming clients' tokens/s over generate's on the same requests, every transport",
             "x_generate", ">=", 0.8, where={"scenario": "load"}),
    ),
    "disaggregation": (
        Goal("transfers (q hand-off, (o, lse) merge) as a share of the step at B=64, split",
             "transfer_frac", "<", 0.05, where={"layout": "split", "B": 64}),
        Goal("transfers as a share of the step at B=256, split", "transfer_frac", "<", 0.02,
             where={"layout": "split", "B": 256}),
    ),
    "disaggregation_scaling": (
        Goal("shared-attention scaling efficiency, every n > 1 shared devices", "scaling_eff",
             ">=", 0.8, where={"n_shared": (">", 1)}),
    ),
    "train_retrieval": (
        Goal("held-out exact match at a document of >= 8K tokens, best eval", "eval_acc", ">=",
             0.95, where={"length": (">=", 8192)}, over="any"),
    ),
    "accuracy": (
        Goal("accuracy over dense at 75% sparsity, best routing", "acc_over_dense", ">=", 0.99,
             where={"mode": "sparse", "sparsity": 0.75}, over="any"),
    ),
    # accuracy --accuracy_reuse: answers by decode steps that re-route every r steps.
    "accuracy_reuse": tuple(
        Goal(f"accuracy over dense at 75% sparsity, int4 router, re-routing every {r} decode "
             f"steps, best routing", "acc_over_dense", ">=", 0.99,
             where={"mode": "sparse", "scorer": "int4", "sparsity": 0.75, "reuse": r},
             over="any")
        for r in (1, 4, 16)),
}
