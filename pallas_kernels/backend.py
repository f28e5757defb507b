"""Backend selection shared by every kernel entry point.

`backend="auto"` picks the Pallas kernel written for the platform JAX runs on ("gpu" on CUDA,
"tpu" on TPU) and the portable XLA reference elsewhere. Which backend ran is logged once per
(op, backend, interpret), so a slow fallback never hides.
"""

from __future__ import annotations

import logging

import jax

BACKENDS = ("auto", "gpu", "tpu", "xla")

logger = logging.getLogger("pallas_kernels")
_logged: set[str] = set()


def log_once(message: str) -> None:
  """Logs `message` at INFO the first time it is seen (calls under jit log at trace time)."""
  if message not in _logged:
    _logged.add(message)
    logger.info("%s", message)


def resolve_backend(backend: str, *, op: str, interpret: bool = False) -> str:
  """Returns the concrete backend ("gpu", "tpu" or "xla") for `backend` and logs it once.

  Args:
    backend: one of "auto", "gpu", "tpu", "xla".
    op: name of the calling op, used in the log line and errors.
    interpret: whether the Pallas kernel will run in interpret mode (logged).

  Raises:
    ValueError: unknown backend name.
  """
  if backend not in BACKENDS:
    raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    platform = jax.default_backend()
    backend = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(platform, "xla")
  if backend == "xla" and interpret:
    raise ValueError(f"{op}: interpret=True needs a Pallas backend ('gpu' or 'tpu'), not 'xla'")
  mode = " (Pallas interpret mode)" if interpret else ""
  log_once(f"{op}: backend={backend}{mode} on platform {jax.default_backend()}")
  return backend


def num_cores() -> int:
  """Streaming multiprocessors of the first device on GPU (132 on H100 SXM if unknown)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def is_hopper() -> bool:
  """Whether the first device is a Hopper GPU (sm_90: wgmma, TMA)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def tpu_interpret(interpret: bool):
  """The `interpret=` value for a TPU pallas_call: TPU interpret mode when asked, else False."""
  if not interpret:
    return False
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.InterpretParams()
