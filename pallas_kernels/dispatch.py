"""One dispatch layer for every op: resolve an implementation, pick its config, call, merge, unfold.

An `Op` turns the user's arguments into a validated problem and owns a table of
`Implementation`s ("xla", "triton", "mosaic_gpu", "mosaic_tpu"). A call resolves
`implementation=` ("auto" or a name; `backend=` is kept as an alias naming a family: "auto",
"gpu", "tpu", "xla") to a `Plan` (implementation + config), runs it, and, when the kernel returns
partial states, merges them by log-sum-exp and unfolds the query rows back to [B, T, Hq, ...].

"auto" picks the family of the platform JAX runs on (the GPU implementations on a GPU, Mosaic TPU
on a TPU, XLA elsewhere; with `interpret=True` on a CPU, the GPU family in interpret mode, whose
semantics are the Triton lowering's) and, within the family, the implementation whose config
type a given `config=` is, else the plan the chip's measured tuning table gives for the shape
(`tuning_table`; compiled calls), else the implementation its tuning module prefers. The plan
each call used is logged once (logger `pallas_kernels`, INFO) and kept in `plans_used()`.

A resolved call runs inside one jitted function (`_execute`): calls with equal plans and
shapes, such as a model's unrolled layers, share one lowered and compiled kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import checks, layout, quant, targets, tuning_table
from pallas_kernels.merge import merge_partials

BACKENDS = ("auto", "gpu", "tpu", "xla")

logger = logging.getLogger("pallas_kernels")
_logged: set[str] = set()
_used: dict[str, Plan] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
  """One call's validated arguments: the queries, their shape letters, the score scale and the
  K/V dequantization scales (`pallas_kernels.quant`; None: K/V as stored). Each op extends it
  with its own inputs.

  A pytree (each subclass is registered): its array fields are the leaves, every other field
  (shapes, sizes, Python scalars) is static, so a problem passes whole through `jax.jit`."""

  q: Any  # [B, T, Hq, D]
  dims: layout.AttentionDims
  sm_scale: float | None
  k_scale: Any = None  # [Hkv] float32
  v_scale: Any = None

  @property
  def dtype(self):
    return self.q.dtype

  def arrays(self) -> list:
    """Its array fields (jax / NumPy arrays, tracers or, when planning, ShapeDtypeStructs)."""
    return [x for f in dataclasses.fields(self)
            if hasattr(x := getattr(self, f.name), "shape") and hasattr(x, "dtype")]

  def scaled(self) -> Problem:
    """What the kernels run: the key scales folded into the queries."""
    if self.k_scale is None:
      return self
    return dataclasses.replace(self, q=quant.scale_heads(self.q, self.k_scale))

  def unscaled(self, out):
    """The op's (o, lse) from the kernels': the value scales applied to o."""
    if self.v_scale is None:
      return out
    o, lse = out
    return quant.scale_heads(o, self.v_scale), lse

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_pytree_node(cls, _flatten_problem,
                                       functools.partial(_unflatten_problem, cls))


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _flatten_problem(p: Problem):
  values = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
  arrays = tuple(name for name, x in values.items() if _is_array(x))
  static = tuple((name, x) for name, x in values.items() if name not in arrays)
  return tuple(values[name] for name in arrays), (arrays, static)


def _unflatten_problem(cls, aux, leaves) -> Problem:
  arrays, static = aux
  return cls(**dict(zip(arrays, leaves)), **dict(static))


class Plan(NamedTuple):
  """What a call runs: the op, the implementation's name and its config (None for "xla")."""

  op: str
  implementation: str
  config: Any


class Partials(NamedTuple):
  """Normalized partial states of a kernel, stacked along `axis`; removing that axis leaves
  o [Hkv, rows, D] and lse [Hkv, rows] with the M = B*T*G folded query rows first (padding rows
  after them are dropped)."""

  o: jax.Array
  lse: jax.Array
  axis: int


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to run an op.

  platform: "gpu" or "tpu", where its kernel compiles; None for XLA (anywhere).
  config_type: its frozen config class; None takes no config.
  run: (problem, config, interpret) -> `Partials`, or the final (o, lse).
  default_config: (problem, target) -> config, the tuning module's heuristic.
  candidates: (problem, target) -> configs to sweep (the default first).
  unsupported: (problem, config, target, interpret) -> why it cannot run, or None.
  interpretable: whether interpret=True can run it on a CPU.
  offsets_32bit: Pallas Triton: compiled, it cannot take a problem holding a 1-byte array of
    2-4 GiB (`checks.offsets_32bit_unsupported`).
  """

  name: str
  platform: str | None
  run: Callable[..., Any]
  config_type: type | None = None
  default_config: Callable[..., Any] | None = None
  candidates: Callable[..., list] | None = None
  unsupported: Callable[..., str | None] = lambda problem, config, target, interpret: None
  interpretable: bool = True
  offsets_32bit: bool = False

  def why_not(self, problem, config, target, interpret: bool) -> str | None:
    """Why it cannot run `problem` with `config`, or None: `unsupported`, and compiled with
    `offsets_32bit`, an array it cannot address."""
    return self.unsupported(problem, config, target, interpret) or (
        None if interpret or not self.offsets_32bit
        else checks.offsets_32bit_unsupported(problem.arrays()))


@dataclasses.dataclass(frozen=True)
class Op:
  """An op: its argument validation, its implementations, and the "auto" choice per platform.

  problem: (*args, **kwargs) -> the validated `Problem`.
  choose: (problem, platform, target, interpret) -> the implementation "auto" runs there.
  """

  name: str
  problem: Callable[..., Any]
  implementations: dict[str, Implementation]
  choose: Callable[..., str]


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
  OPS[op.name] = op
  return op


def _op(name: str) -> Op:
  if name not in OPS:
    raise ValueError(f"op must be one of {sorted(OPS)}, got {name!r}")
  return OPS[name]


def implementations(op: str) -> tuple[str, ...]:
  """The implementation names registered for an op ("shared_attention", "unique_attention",
  "chunk_attention")."""
  return tuple(_op(op).implementations)


def _platform(family: str, interpret: bool) -> str:
  """The platform whose implementations a family means: "gpu", "tpu" or "xla"."""
  if family == "auto":
    running = jax.default_backend()
    family = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(
        running, "gpu" if interpret else "xla")
  return family


def _target(platform: str | None, target) -> targets.Target | None:
  if platform is None:
    return None
  if target is None:
    return targets.current(platform)
  tgt = targets.target(target) if isinstance(target, str) else target
  if tgt.platform != platform:
    raise ValueError(f"target {tgt.name} is a {tgt.platform.upper()}, but the implementation "
                     f"runs on {platform.upper()}")
  return tgt


def _implementation_of(op: Op, config, platform: str) -> str:
  """The implementation of `platform` whose config type `config` is."""
  for impl in op.implementations.values():
    if impl.platform == platform and impl.config_type and isinstance(config, impl.config_type):
      return impl.name
  types = sorted(i.config_type.__name__ for i in op.implementations.values()
                 if i.platform == platform and i.config_type)
  raise ValueError(f"{op.name}: config must be one of {types} on {platform.upper()}, got "
                   f"{type(config).__name__}")


def resolve(op: Op, problem, *, implementation: str = "auto", backend: str | None = None,
            config: Any = None, interpret: bool = False, target=None) -> Plan:
  """The plan a call would run (see the module docstring); raises ValueError if it cannot run."""
  names = tuple(op.implementations)
  if not isinstance(interpret, bool):
    raise ValueError(f"{op.name}: interpret must be True or False, got {interpret!r}")
  if backend is not None:
    if implementation != "auto":
      raise ValueError(f"{op.name}: give implementation= or its alias backend=, not both")
    if backend not in BACKENDS:
      raise ValueError(f"{op.name}: backend must be one of {BACKENDS}, got {backend!r}")
    family = backend
  elif implementation == "auto":
    family = "auto"
  elif implementation in names:
    family = None
  else:
    raise ValueError(f"{op.name}: implementation must be 'auto' or one of {names}, got "
                     f"{implementation!r}")
  if family is not None:
    platform = _platform(family, interpret)
    tuned = None
    if platform != "xla" and config is None and not interpret:
      tuned = tuning_table.lookup(op, problem, _target(platform, target))
    if tuned is not None:
      implementation, config = tuned
    elif platform != "xla" and config is not None:  # the config names its implementation
      implementation = _implementation_of(op, config, platform)
    else:
      implementation = "xla" if platform == "xla" else op.choose(
          problem, platform, _target(platform, target), interpret)
  impl = op.implementations[implementation]
  if interpret and impl.platform is None:
    raise ValueError(f"{op.name}: interpret=True runs a Pallas kernel; the {impl.name!r} "
                     f"implementation has none (use implementation='auto' or name a Pallas "
                     f"implementation)")
  if interpret and not impl.interpretable:
    raise ValueError(f"{op.name}: implementation {impl.name!r} has no interpret mode")
  tgt = _target(impl.platform, target)
  if config is None and impl.default_config is not None:
    config = impl.default_config(problem, tgt)
  elif config is not None and (impl.config_type is None
                               or not isinstance(config, impl.config_type)):
    want = impl.config_type.__name__ if impl.config_type else "None (it takes no config)"
    raise ValueError(f"{op.name}: config for implementation {impl.name!r} must be {want}, got "
                     f"{type(config).__name__}")
  reason = impl.why_not(problem, config, tgt, interpret)
  if reason:
    raise ValueError(f"{op.name}: implementation {impl.name!r} cannot run this call: {reason}")
  return Plan(op.name, impl.name, config)


def finish(partials: Partials, dims: layout.AttentionDims,
           dtype) -> tuple[jax.Array, jax.Array]:
  """Merges a kernel's partial states and unfolds its rows: (o [B, T, Hq, D] in dtype,
  lse [B, T, Hq] float32). A row whose partials all have lse = -inf (no valid key) gives o = 0
  (a kernel may leave such a row unwritten, or fill it from another tile's slot); the merge
  gives that over several partials, here a single one is masked too."""
  o, lse, axis = partials
  if o.shape[axis] > 1:
    o, lse = merge_partials(o, lse, axis)
  else:
    o, lse = jnp.squeeze(o, axis), jnp.squeeze(lse, axis)
    o = jnp.where((lse == -jnp.inf)[..., None], jnp.zeros((), o.dtype), o)
  o = o.reshape(dims.Hkv, -1, dims.D)[:, :dims.M]
  lse = lse.reshape(dims.Hkv, -1)[:, :dims.M]
  return (layout.unfold_rows(o, dims.B, dims.T).astype(dtype),
          layout.unfold_rows(lse, dims.B, dims.T))


def call(op: Op, args: tuple, kwargs: dict, *, implementation: str = "auto",
         backend: str | None = None, config: Any = None,
         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Validates, resolves, runs and finishes one call of `op`: the body of every public op.

  Args:
    op, args, kwargs: the op and the user's arguments of it.
    implementation: "auto" (module docstring) or one of the op's implementation names.
    backend: instead of implementation=, a family: "auto", "gpu", "tpu" or "xla".
    config: the chosen implementation's own config; default: its tuning heuristic.
    interpret: run the Pallas kernel in interpret mode (TPU interpret mode for "mosaic_tpu"),
      on any machine.
  """
  problem = op.problem(*args, **kwargs)
  plan = resolve(op, problem, implementation=implementation, backend=backend, config=config,
                 interpret=interpret)
  _record(plan, interpret)
  return _execute(problem, op.name, plan.implementation, plan.config, interpret)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _execute(problem: Problem, op: str, implementation: str, config: Any, interpret: bool):
  """Runs and finishes a resolved call. One jitted function for every call: calls with equal
  plans and shapes (a model's unrolled layers) share one traced and lowered body, which Mosaic
  GPU compiles once rather than per call site (H200, 8 unrolled unique_attention calls wrapped
  so by hand: 1.0 s to lower and 2.3 s to compile, against 5.9 s and 12.5 s; compile_dedup.md).
  """
  out = OPS[op].implementations[implementation].run(problem.scaled(), config, interpret)
  return problem.unscaled(finish(out, problem.dims, problem.dtype)
                          if isinstance(out, Partials) else out)


def _record(plan: Plan, interpret: bool) -> None:
  _used[plan.op] = plan
  mode = " in interpret mode" if interpret else ""
  message = (f"{plan.op}: {plan.implementation}{mode} on {jax.default_backend()}, "
             f"config {plan.config}")
  if message not in _logged:  # calls under jit log once, at trace time
    _logged.add(message)
    logger.info("%s", message)


def plans_used() -> dict[str, Plan]:
  """The plan of the latest call (traced or eager) of each op in this process."""
  return dict(_used)


def plan(op: str, *args, implementation: str = "auto", backend: str | None = None,
         config: Any = None, interpret: bool = False, target=None, **kwargs) -> Plan:
  """The plan `op(*args, **kwargs)` would run, without running it.

  Takes the op's own arguments (arrays or jax.ShapeDtypeStruct) and `target`: a preset name
  ("h100", "h200", "a100", "v4", "v5e", "v5p", "v6e") or a `targets.GpuTarget` / `TpuTarget` to
  plan the tiling for instead of the running chip.
  """
  o = _op(op)
  return resolve(o, o.problem(*args, **kwargs), implementation=implementation, backend=backend,
                 config=config, interpret=interpret, target=target)


def sweep(op: str, *args, implementation: str = "auto", backend: str | None = None,
          interpret: bool = False, target=None, **kwargs) -> list[Plan]:
  """Plans to time for `op(*args, **kwargs)`: the default plan first, then every candidate of
  every implementation of its platform that can run the call (duplicates dropped)."""
  o = _op(op)
  problem = o.problem(*args, **kwargs)
  first = resolve(o, problem, implementation=implementation, backend=backend,
                  interpret=interpret, target=target)
  platform = o.implementations[first.implementation].platform
  plans = [first]
  for impl in o.implementations.values():
    if impl.platform != platform or impl.candidates is None:
      continue
    tgt = _target(platform, target)
    for cfg in impl.candidates(problem, tgt):
      p = Plan(o.name, impl.name, cfg)
      if p not in plans and not impl.why_not(problem, cfg, tgt, interpret) and (
          impl.interpretable or not interpret):
        plans.append(p)
  return plans


def tpu_interpret(interpret: bool):
  """The `interpret=` value of a TPU pallas_call: TPU interpret mode when asked, else False."""
  if not interpret:
    return False
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.InterpretParams()
