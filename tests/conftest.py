"""Test-session setup that must happen before jax is imported.

Multi-device tests need 8 devices; on CPU, XLA emulates them. Setting the flag here (unless the
caller chose a count) makes the README's plain `python -m pytest -q tests` run them too.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
