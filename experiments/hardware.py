"""Accelerator descriptions for the analytic roofline model: HBM capacity, bandwidth, matmul rates.

Preset figures are vendor datasheet values per chip. Matmul rates are the **dense** rates: NVIDIA's
datasheets headline the 2:4 structured-sparsity rates (2x the dense ones), which no attention or
dense-weight GEMM can use, so the presets hold half of those headline numbers. Interconnect is the
per-chip bandwidth in one direction (NVLink 4: 900 GB/s total = 450 GB/s each way; TPU ICI: the
per-chip figure of the Cloud TPU docs, converted from Gbps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # experiments.timing imports jax; the model itself must not need it
  from experiments.timing import Ceilings

GB = 1e9
TB = 1e12
TFLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One chip. Rates are per chip; a system of n chips is modelled as n times each (ideal
  scaling)."""

  name: str
  hbm_bytes: float
  hbm_bytes_per_s: float
  matmul_flops_bf16: float  # dense
  matmul_flops_fp8: float  # dense; on TPUs without FP8 MXUs, the int8 rate stands in
  interconnect_bytes_per_s: float | None = None  # per chip, one direction

  def matmul_flops(self, element_bytes: int) -> float:
    """Matmul rate for operands of this width: FP8 (1 byte) or BF16 (2 bytes and wider)."""
    return self.matmul_flops_fp8 if element_bytes == 1 else self.matmul_flops_bf16


PRESETS: dict[str, Hardware] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3, 3.35 TB/s, BF16 1,979 / FP8 3,958
    # TFLOPS "with sparsity" -> 989.5 / 1,979 dense; NVLink 900 GB/s.
    "h100": Hardware("H100 SXM", 80 * GB, 3.35 * TB, 989.5 * TFLOPS, 1979 * TFLOPS, 450 * GB),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, same tensor cores as the
    # H100 SXM (BF16 1,979 / FP8 3,958 TFLOPS with sparsity); NVLink 900 GB/s.
    "h200": Hardware("H200 SXM", 141 * GB, 4.8 * TB, 989.5 * TFLOPS, 1979 * TFLOPS, 450 * GB),
    # Cloud TPU v5e docs: 16 GB HBM2, 819 GB/s, 197 TFLOPS bf16, 394 TOPS int8 (dense; no FP8),
    # ICI 1,600 Gbps.
    "v5e": Hardware("TPU v5e", 16 * GB, 0.819 * TB, 197 * TFLOPS, 394 * TFLOPS, 200 * GB),
    # Cloud TPU v5p docs: 95 GB HBM2e, 2,765 GB/s, 459 TFLOPS bf16, 918 TOPS int8; ICI 4,800 Gbps.
    "v5p": Hardware("TPU v5p", 95 * GB, 2.765 * TB, 459 * TFLOPS, 918 * TFLOPS, 600 * GB),
    # Cloud TPU v6e (Trillium) docs: 32 GB HBM, 1,640 GB/s, 918 TFLOPS bf16, 1,836 TOPS int8;
    # ICI 3,584 Gbps.
    "v6e": Hardware("TPU v6e", 32 * GB, 1.64 * TB, 918 * TFLOPS, 1836 * TFLOPS, 448 * GB),
}


def calibrated(hw: Hardware, ceilings: Ceilings) -> Hardware:
  """hw with the bandwidth and matmul rates measured on the current device.

  The bandwidth is the streaming read rate (the model counts the KV bytes read); the FP8 rate is
  the measured one where the run measured it, else the vendor FP8:BF16 ratio applied to the bf16
  rate. Capacity and interconnect stay the preset's.
  """
  fp8 = ceilings.fp8_matmul_flops
  if not math.isfinite(fp8):
    fp8 = ceilings.matmul_flops * hw.matmul_flops_fp8 / hw.matmul_flops_bf16
  return dataclasses.replace(
      hw,
      name=f"{hw.name} (calibrated)",
      hbm_bytes_per_s=ceilings.read_bytes_per_s,
      matmul_flops_bf16=ceilings.matmul_flops,
      matmul_flops_fp8=fp8,
  )
