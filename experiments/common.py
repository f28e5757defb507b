"""Flags every experiment shares, the package's default paths, and the environment header
written with each result."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any

import jax
from absl import flags

from experiments import shapes

FLAGS = flags.FLAGS

# Default paths resolve inside this package, never against the current folder.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def package_path(*parts: str) -> str:
  """A path inside the experiments package (experiments/... in a checkout)."""
  return os.path.join(PACKAGE_DIR, *parts)


def shown(text: str) -> str:
  """`text` with paths inside the package written as experiments/..., so that result headers
  and notes name no folder of the machine that ran them."""
  return text.replace(os.path.dirname(PACKAGE_DIR) + os.sep, "")


flags.DEFINE_string("out_dir", package_path("out"),
                    "Where CSV, markdown and plots are written (default: experiments/out, "
                    "inside the package).")
flags.DEFINE_enum("backend", "auto", ["auto", "gpu", "tpu", "xla"], "Kernel backend.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
flags.DEFINE_integer("seed", 0, "PRNG seed.", lower_bound=0)  # numpy's generators refuse < 0
flags.DEFINE_string("shape", "llama3_1_8b",
                    f"Attention heads: one of {', '.join(shapes.SHAPES)} (experiments/shapes.py) "
                    "or Hq/Hkv/D.")


@flags.validator("shape")
def _check_shape(spec: str) -> bool:
  try:
    shapes.parse(spec)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from e
  return True


def validate(names: str | tuple[str, ...], ok: Callable[[Any], bool], message: str) -> None:
  """Makes a bad flag value an error at parse time, before any work: absl stops the run with
  "flag --NAME=VALUE: message" unless ok(value) (for several names, ok(dict of their values)).
  A value ok cannot read (TypeError, ValueError) is bad too."""

  def check(value) -> bool:
    try:
      return bool(ok(value))
    except (TypeError, ValueError):
      return False

  if isinstance(names, str):
    flags.register_validator(names, check, message=message)
  else:
    flags.register_multi_flags_validator(names, check, message=message)


def validate_items(name: str, ok: Callable[[str], bool], what: str, *, empty: bool = False) -> None:
  """`validate` for a list flag: every item ok, and at least one unless `empty`."""
  validate(name, lambda items: (empty or items) and all(ok(x) for x in items),
           f"must be a comma-separated list of {what}" + (" (or empty)" if empty else ""))


def ints(name: str, minimum: int = 1, *, empty: bool = False) -> None:
  """A list flag of integers >= minimum."""
  validate_items(name, lambda x: int(x) >= minimum, f"integers >= {minimum}", empty=empty)


def choices(name: str, allowed, *, empty: bool = False) -> None:
  """A list flag of names from `allowed`."""
  validate_items(name, lambda x: x in allowed, f"values among: {', '.join(allowed)}", empty=empty)


def fraction(name: str) -> None:
  """A float flag in [0, 1) (a sparsity: 1 would keep nothing)."""
  validate(name, lambda x: 0 <= x < 1, "must be in [0, 1)")


def fractions(name: str) -> None:
  """A list flag of numbers in [0, 1)."""
  validate_items(name, lambda x: 0 <= float(x) < 1, "numbers in [0, 1)")


def shape() -> shapes.Shape:
  """The attention shape chosen by --shape."""
  return shapes.parse(FLAGS.shape)


# The environment variables that change what a run measures or whether it fits (the device memory
# JAX may take, the allocator, compiler flags): a command shown without them is not reproducible.
# Read when the launcher starts, before an experiment sets any for its own processes; a path in a
# value (a dump folder, a toolkit) is shown as <path>.
_ENV_SHOWN = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
              "XLA_PYTHON_CLIENT_ALLOCATOR", "TF_GPU_ALLOCATOR", "XLA_FLAGS", "NCCL_NVLS_ENABLE")


def env_shown(environ) -> dict[str, str]:
  """The `_ENV_SHOWN` variables set in environ, paths in their values as <path>."""
  return {k: re.sub(r"(?<![\w.])/[^\s,]*", "<path>", environ[k])
          for k in _ENV_SHOWN if k in environ}


_ENV_AT_START = env_shown(os.environ)


def environment(fixed: dict[str, str] | None = None) -> dict[str, str]:
  """Device, versions, date, the exact command line and every flag value, for result headers.

  Args:
    fixed: flags the experiment fixes whatever the command line says (name -> the value it
      runs with), shown with that value.
  """
  fixed = fixed or {}
  dev = jax.devices()[0]
  return {
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')} x{jax.device_count()}",
      "jax": jax.__version__,
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": shown(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in _ENV_AT_START.items()),
                                 "python -m experiments.run", *sys.argv[1:]])),
      # (a multi flag serializes as one line per value)
      "flags": shown(" ".join(f"--{f.name}={fixed[f.name]}" if f.name in fixed
                              else f.serialize().replace("\n", " ")
                              for f in _experiment_flags() if f.serialize())),
  }


def _experiment_flags():
  """Every flag the experiments define (shared and the chosen module's), defaults included."""
  chosen = f"experiments.{FLAGS.experiment}"
  by_module = FLAGS.flags_by_module_dict()
  return sorted((f for m in ("experiments.common", chosen) for f in by_module.get(m, [])),
                key=lambda f: f.name)
