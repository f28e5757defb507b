"""Measured plans per chip kind: what a sweep on that chip found fastest, consulted by "auto".

The tiling heuristics (`gpu.tuning`, `tpu.tuning`) are rules measured on a few shapes; a tuning
table holds the winners of a sweep (`pallas_kernels.sweep`, every candidate of every
implementation, each timed) on one chip kind, written by

    python -m experiments.run --experiment=tune --out_dir=OUT

(`experiments/tune.py`). Tables ship in `pallas_kernels/tuning_tables/` (`nvidia_h200.json`); the
file named by $PALLAS_KERNELS_TUNING, if set, is read too and wins over them, so a new chip is
one command and one environment variable away from tuned.

A compiled "auto" call (not interpret mode, no config given) looks up its key: the op, Hkv, G,
D, T, the query and K/V dtypes and the op's static extras (page size), in the table of the chip
it plans for (the table's chip name, normalized, is a prefix of the target's). Among the entries
of that key measured at an S within a factor of 2 of the call's, it takes the one whose
M = B*T*G is nearest in log2; an entry more than a factor of 2 away in M is not used (the
heuristic plans instead: the sweep's batch sizes are powers of two, so every M between the
smallest and largest measured has one), nor one whose row tiles would read K/V more times at
the call's M than at its own. The entry's config is refitted to the call (num_splits at most the
call's key blocks) and checked like any config; one that cannot run is logged and the
heuristic plans instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp

logger = logging.getLogger("pallas_kernels")

TABLES_DIR = Path(__file__).parent / "tuning_tables"
ENV = "PALLAS_KERNELS_TUNING"
VERSION = 1
# Ops with tables: their best plan depends on the shape alone. chunk_attention's depends on
# which chunks the router picks, which a sweep over random ids would not represent.
OPS = ("shared_attention", "unique_attention")
MAX_M_RATIO = 2.0
# Splits and tiles measured at one S do not carry to a much longer or shorter one (H200: a table
# from S=128K, used at S=1M, cost 1-19%: fp8.md).
MAX_S_RATIO = 2.0


def chip_slug(name: str) -> str:
  """A chip name normalized for matching: lower-case letters and digits only."""
  return re.sub(r"[^a-z0-9]", "", name.lower())


def file_stem(chip: str) -> str:
  """The file name (without .json) of `chip`'s table: "NVIDIA H200" -> "nvidia_h200"."""
  return re.sub(r"[^a-z0-9]+", "_", chip.lower()).strip("_")


def key_of(op: str, problem) -> dict[str, Any]:
  """The fields an entry must match: the op, heads, head dim, query tokens, dtypes, extras."""
  d = problem.dims
  key = dict(op=op, Hkv=d.Hkv, G=d.G, D=d.D, T=d.T, dtype=jnp.dtype(problem.dtype).name,
             kv_dtype=jnp.dtype(_kv(problem).dtype).name)
  if hasattr(problem, "page_size"):
    key["page_size"] = problem.page_size
  return key


def _kv(problem):
  return problem.k if hasattr(problem, "k") else problem.k_pages


def entry(op: str, problem, implementation: str, config, **measured) -> dict[str, Any]:
  """A table entry for `problem` (what the tune experiment writes): its key, M and S, the plan,
  and `measured` (e.g. ms, heuristic_ms)."""
  return dict(key=key_of(op, problem), M=problem.dims.M, S=problem.dims.S,
              implementation=implementation,
              config=None if config is None else dataclasses.asdict(config), **measured)


def write(path: str | os.PathLike, chip: str, entries: list[dict[str, Any]],
          **header) -> None:
  """Writes a table for `chip` (its name as `targets` sees it, e.g. "NVIDIA H200")."""
  Path(path).write_text(json.dumps(dict(version=VERSION, chip=chip, **header, entries=entries),
                                   indent=1) + "\n")


def _read(path: Path) -> dict[str, Any] | None:
  try:
    table = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    logger.warning("tuning table %s unreadable (%s): not used", path, e)
    return None
  if not isinstance(table, dict) or table.get("version") != VERSION or "chip" not in table:
    logger.warning("tuning table %s: not a version-%d table: not used", path, VERSION)
    return None
  return table


@functools.lru_cache(maxsize=None)
def _packaged() -> tuple[dict[str, Any], ...]:
  paths = sorted(TABLES_DIR.glob("*.json")) if TABLES_DIR.is_dir() else []
  return tuple(t for t in map(_read, paths) if t is not None)


@functools.lru_cache(maxsize=None)
def _from_env(path: str) -> dict[str, Any] | None:
  return _read(Path(path))


def table_for(target) -> dict[str, Any] | None:
  """The table of `target`'s chip kind, or None: $PALLAS_KERNELS_TUNING's if its chip matches,
  else the packaged table with the longest matching chip name."""
  name = chip_slug(target.name)
  matches = lambda t: t is not None and name.startswith(chip_slug(t["chip"]))
  env = os.environ.get(ENV)
  if env and matches(user := _from_env(env)):
    return user
  found = [t for t in _packaged() if matches(t)]
  return max(found, key=lambda t: len(chip_slug(t["chip"]))) if found else None


def _ratio(a: float, b: float) -> float:
  return max(a / b, b / a)


def nearest(entries: list[dict[str, Any]], key: dict[str, Any], M: int,
            S: int) -> dict[str, Any] | None:
  """The entry of `key` measured within MAX_S_RATIO of S whose M is nearest (in log2, then S),
  or None when there is none within MAX_M_RATIO of M."""
  same = [e for e in entries if e.get("key") == key and _ratio(e["S"], S) <= MAX_S_RATIO]
  if not same:
    return None
  best = min(same, key=lambda e: (abs(math.log2(e["M"] / M)), abs(math.log2(e["S"] / S))))
  return best if _ratio(best["M"], M) <= MAX_M_RATIO else None


def _row_tiles(config, M: int) -> int | None:
  """Row tiles of M rows under `config` (each reads all of K/V), or None if it has no row tile."""
  rows = getattr(config, "block_m", None) or getattr(config, "rows_per_cta", None)
  return math.ceil(M / rows) if rows else None


# Ops whose requests each read K/V of their own (pages): a row tile holds one request's T*G rows,
# which the table's key fixes, so its reads of K/V do not change with M (= B*T*G).
_OWN_KV = frozenset({"unique_attention"})


_ignored: contextvars.ContextVar[bool] = contextvars.ContextVar("tuning_table_ignored",
                                                               default=False)


@contextlib.contextmanager
def ignored():
  """Inside the block "auto" plans by the heuristics alone (what a sweep compares against)."""
  token = _ignored.set(True)
  try:
    yield
  finally:
    _ignored.reset(token)


def lookup(op, problem, target) -> tuple[str, Any] | None:
  """(implementation name, config) the table of `target` gives for `problem`, or None.

  Args:
    op: the `dispatch.Op`.
    problem: its validated problem.
    target: the chip the call plans for.
  """
  if op.name not in OPS or target is None or _ignored.get():
    return None
  table = table_for(target)
  if table is None:
    return None
  hit = nearest(table["entries"], key_of(op.name, problem), problem.dims.M, problem.dims.S)
  if hit is None:
    return None
  impl = op.implementations.get(hit["implementation"])
  where = f"{op.name}: tuning table of {table['chip']}"
  if impl is None or impl.platform != target.platform:
    logger.warning("%s names implementation %r, which cannot run on %s: using the heuristic",
                   where, hit["implementation"], target.name)
    return None
  try:
    config = None if hit["config"] is None else impl.config_type(**hit["config"])
  except (TypeError, ValueError) as e:
    logger.warning("%s has a config this version refuses (%s): using the heuristic", where, e)
    return None
  config = _refit(config, problem)
  if (op.name not in _OWN_KV and (tiles := _row_tiles(config, problem.dims.M))
      and tiles > _row_tiles(config, hit["M"])):
    logger.info("%s: its plan for M=%d would read K/V %d times at M=%d: using the heuristic",
                where, hit["M"], tiles, problem.dims.M)
    return None
  reason = impl.why_not(problem, config, target, False)
  if reason:
    logger.info("%s: its %s plan cannot run this call (%s): using the heuristic", where,
                impl.name, reason)
    return None
  return impl.name, config


def _refit(config, problem):
  """num_splits at most the call's key blocks (an entry measured at a larger S or U may split
  more)."""
  if config is None or not hasattr(config, "num_splits"):
    return config
  keys = getattr(config, "block_k", None) or config.pages_per_block * problem.page_size
  blocks = max(1, math.ceil(problem.dims.S / keys))
  return dataclasses.replace(config, num_splits=min(config.num_splits, blocks))
