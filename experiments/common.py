"""Flags every experiment shares, and the environment header written with each result."""

from __future__ import annotations

import datetime
import platform
import sys

import jax
from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("out_dir", "experiments/out", "Where CSV, markdown and plots are written.")
flags.DEFINE_enum("backend", "auto", ["auto", "gpu", "tpu", "xla"], "Kernel backend.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")


def environment() -> dict[str, str]:
  """Device, versions, date, the exact command line and every flag value, for result headers."""
  dev = jax.devices()[0]
  return {
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')} x{jax.device_count()}",
      "jax": jax.__version__,
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": " ".join(["python -m experiments.run", *sys.argv[1:]]),
      "flags": " ".join(s for s in (f.serialize() for f in _experiment_flags()) if s),
  }


def _experiment_flags():
  """Every flag the experiments define (shared and the chosen module's), defaults included."""
  chosen = f"experiments.{FLAGS.experiment}"
  by_module = FLAGS.flags_by_module_dict()
  return sorted((f for m in ("experiments.common", chosen) for f in by_module.get(m, [])),
                key=lambda f: f.name)
