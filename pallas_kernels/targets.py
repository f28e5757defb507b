"""The chips the tiling heuristics plan for: what each needs to know of a GPU or a TPU.

A heuristic never asks the running device directly: it gets a `GpuTarget` or `TpuTarget`, by
default `current(platform)` (the running chip when it is of that platform, else a preset), or a
named preset (`target("h200")`, `target("v5e")`), so a TPU kernel's tiling can be planned and
lowered on a machine without a TPU (and a GPU kernel's in interpret mode on a CPU).

Lowering a TPU kernel also needs a chip: some of Mosaic's lowering rules read the generation
from the device JAX lowers for. `lowering_for(chip)` names it, so a Pallas TPU kernel lowers
for any generation on any machine::

    with targets.lowering_for("v5e"):
      lowered = jax.jit(f).trace(*shape_dtype_structs).lower(lowering_platforms=("tpu",))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator

import jax

KIB = 1024
MIB = 1024 * KIB


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """An NVIDIA GPU: streaming multiprocessors, opt-in shared memory per block, compute capability.

  smem_per_block: the most shared memory one block can opt in to (bytes); a kernel's tiling must
  fit under it (`gpu.tuning` computes each config's use).
  """

  name: str
  num_cores: int
  smem_per_block: int
  compute_capability: tuple[int, int]

  platform = "gpu"

  @property
  def is_hopper(self) -> bool:
    """sm_90: wgmma and TMA, what the Mosaic GPU kernels need."""
    return self.compute_capability[0] == 9


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """A TPU chip as one `pallas_call` sees it.

  name: its device kind as JAX knows it ("TPU v5e", "TPU v5 lite", ...), the generation
  `lowering_for` lowers for. num_cores: TensorCores one call spreads its "parallel" grid axes
  over (2 on the megacore chips v4 and v5p, 1 on v5e and v6e). vmem_bytes: vector memory per
  core. mxu: the matrix unit's side (128 or 256): block dimensions that feed it are best
  multiples of it. scoped_vmem_bytes: the VMEM Mosaic gives a kernel unless its
  `vmem_limit_bytes` asks for more.
  """

  name: str
  num_cores: int
  vmem_bytes: int
  mxu: int
  scoped_vmem_bytes: int

  platform = "tpu"


# Shared memory per block a kernel can opt in to, by compute capability major.minor (CUDA
# programming guide, "Technical Specifications per Compute Capability").
_SMEM_BY_CC = {(7, 0): 96 * KIB, (7, 5): 64 * KIB, (8, 0): 163 * KIB, (8, 6): 99 * KIB,
               (8, 7): 163 * KIB, (8, 9): 99 * KIB, (9, 0): 227 * KIB, (10, 0): 227 * KIB,
               (12, 0): 99 * KIB}

GPU_PRESETS: dict[str, GpuTarget] = {
    "h100": GpuTarget("NVIDIA H100 SXM", 132, 227 * KIB, (9, 0)),
    "h200": GpuTarget("NVIDIA H200 SXM", 132, 227 * KIB, (9, 0)),
    "a100": GpuTarget("NVIDIA A100 SXM", 108, 163 * KIB, (8, 0)),
    "l4": GpuTarget("NVIDIA L4", 58, 99 * KIB, (8, 9)),
}

# Cores per chip and MXU size: Cloud TPU system architecture docs; VMEM per TensorCore: JAX's
# TPU info table (jax/_src/pallas/mosaic/tpu_info.py), which `lowering_for` makes Mosaic use;
# default scoped VMEM: 16 MiB before v6e, 32 MiB on v6e, as reported by Pallas kernel authors
# (not measured here: no TPU).
TPU_PRESETS: dict[str, TpuTarget] = {
    "v4": TpuTarget("TPU v4", 2, 16 * MIB, 128, 16 * MIB),
    "v5e": TpuTarget("TPU v5e", 1, 128 * MIB, 128, 16 * MIB),
    "v5p": TpuTarget("TPU v5p", 2, 64 * MIB, 128, 16 * MIB),
    "v6e": TpuTarget("TPU v6e", 1, 128 * MIB, 256, 32 * MIB),
}

# Planned for when the running device is not of the platform (interpret mode, cross-lowering).
DEFAULT = {"gpu": "h100", "tpu": "v5p"}

Target = GpuTarget | TpuTarget


def target(name: str) -> Target:
  """A preset by name: one of GPU_PRESETS or TPU_PRESETS."""
  key = name.lower()
  if key in GPU_PRESETS:
    return GPU_PRESETS[key]
  if key in TPU_PRESETS:
    return TPU_PRESETS[key]
  raise ValueError(f"target must be one of {sorted(GPU_PRESETS) + sorted(TPU_PRESETS)}, "
                   f"got {name!r}")


def _gpu_from_device(dev) -> GpuTarget:
  cc = str(getattr(dev, "compute_capability", "9.0")).split(".")
  cc = (int(cc[0]), int(cc[1]) if len(cc) > 1 else 0)
  cores = int(getattr(dev, "core_count", 0) or GPU_PRESETS[DEFAULT["gpu"]].num_cores)
  smem = getattr(dev, "shared_memory_per_block_optin", 0) or _SMEM_BY_CC.get(cc, 99 * KIB)
  return GpuTarget(str(getattr(dev, "device_kind", "gpu")), cores, int(smem), cc)


def _tpu_from_device(dev) -> TpuTarget:
  kind = str(getattr(dev, "device_kind", "")).lower()  # "tpu v4", "tpu v5 lite", "tpu v5p", ...
  if "v6" in kind:
    return TPU_PRESETS["v6e"]
  if "v5" in kind:
    return TPU_PRESETS["v5e" if ("lite" in kind or "v5e" in kind) else "v5p"]
  return TPU_PRESETS["v4"]


@functools.lru_cache(maxsize=None)
def _current(platform: str, backend: str) -> Target:
  if backend in ("gpu", "cuda", "rocm") and platform == "gpu":
    return _gpu_from_device(jax.devices()[0])
  if backend == "tpu" and platform == "tpu":
    return _tpu_from_device(jax.devices()[0])
  return target(DEFAULT[platform])


# The chip of the innermost `lowering_for`, if any.
_lowering: contextvars.ContextVar[TpuTarget | None] = contextvars.ContextVar(
    "lowering_for", default=None)


def current(platform: str) -> Target:
  """The chip to plan for on `platform` ("gpu" or "tpu"): inside `lowering_for`, its TPU; else
  the running chip if JAX runs on `platform`, else that platform's default preset (DEFAULT)."""
  if platform not in DEFAULT:
    raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
  if platform == "tpu" and (chip := _lowering.get()) is not None:
    return chip
  return _current(platform, jax.default_backend())


@contextlib.contextmanager
def lowering_for(chip: str | TpuTarget) -> Iterator[TpuTarget]:
  """Lowers (and by default plans) Pallas TPU kernels for `chip` inside the block, on any machine.

  Sets an abstract mesh whose abstract device is that TPU, JAX's way of naming the chip a
  lowering is for (Mosaic's generation-dependent rules read it), keeping the axes of a mesh
  already in scope; and makes `current("tpu")` return `chip`, so default tilings are planned for
  it too. Lower with `jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",))`. This checks
  Mosaic's lowering rules only: libtpu compiles the kernel for the chip on a TPU.

  Args:
    chip: a TPU preset name ("v4", "v5e", "v5p", "v6e") or a `TpuTarget` whose name is a device
      kind JAX knows.

  Yields:
    The `TpuTarget` lowered for.
  """
  tpu = target(chip) if isinstance(chip, str) else chip
  if not isinstance(tpu, TpuTarget):
    raise ValueError(f"chip must be one of {sorted(TPU_PRESETS)} or a TpuTarget, got {chip!r}")
  abstract_device = getattr(jax.sharding, "AbstractDevice", None)
  if abstract_device is None:
    raise RuntimeError("targets.lowering_for needs jax.sharding.AbstractDevice (jax >= 0.7.2), "
                       f"which jax {jax.__version__} lacks")
  device = abstract_device(device_kind=tpu.name, num_cores=tpu.num_cores, platform="tpu")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # one Explicit axis of size 1: a top-level abstract mesh needs Explicit axes
    mesh = jax.sharding.AbstractMesh((1,), ("tpu",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)
  else:
    mesh = mesh.update(abstract_device=device)
  token = _lowering.set(tpu)
  try:
    with jax.sharding.use_abstract_mesh(mesh):
      yield tpu
  finally:
    _lowering.reset(token)
