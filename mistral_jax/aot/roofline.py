"""A roofline lower bound on the train step's time per chip, from the chip's published peak figures.

Terms, each a time per step on one chip:

- compute = model FLOPs per chip / peak bf16 FLOP/s (``model_flops_per_step``: 6 N tokens + attention, the MFU
  numerator; XLA's own FLOP count would count scanned bodies once);
- HBM = bytes per chip read from and written to HBM (``hlo.hbm_traffic``: every top-level instruction of the
  optimized HLO reads its operands and writes its result once, in-place updates and slices count only the part
  they touch, buffers the compiler keeps in VMEM or host memory not at all, trip-count weighted) / the chip's HBM
  bandwidth. XLA's ``cost_analysis()["bytes accessed"]`` would
  count each while-loop body once (scanned layers, gradient-accumulation steps) and is not used;
- collectives = collective bytes per chip (``hlo.collective_traffic``, trip-count weighted, ragged-all-to-all at its
  expected value) / the chip's ICI bandwidth.

The estimate is the largest term: it assumes perfect overlap of compute, memory traffic and communication, every
ICI link of the chip busy (a collective over one mesh axis uses only that axis's links, so it may take longer), all
collectives on ICI (with ``--num_slices`` > 1 the cross-slice ones go over the much slower data-center network),
matmuls at bf16 peak and HBM at its peak bandwidth. The HBM figure is each HBM buffer's compulsory traffic: a tiled
matmul that re-reads operand tiles from HBM moves more (XLA's TPU cost model counts those re-reads, and reads of
buffers the compiler keeps in VMEM: 2-3x ours on a loop-free MLP, equal on elementwise and reduction programs whose
buffers all live in HBM; on CPU the two agree). It is a lower bound on the step time; the MFU it implies (compute
term / estimate) is an upper bound.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip peaks of a TPU generation."""

    bf16_flops: float  # FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # the "interchip interconnect BW" figure (Gbps / 8)


# Google Cloud TPU system architecture pages (the per-chip key specifications tables):
#   v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, HBM2 1200 GBps; the page gives no ICI figure:
#        2400 Gbps = 6 ICI links x 400 Gbps per direction (https://glennklockwood.com/garden/processors/TPUv4)
#   v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s, 819 GBps, interchip interconnect 1600 Gbps
#   v5p: https://cloud.google.com/tpu/docs/v5p-training  459 TFLOP/s, 2765 GBps, interchip interconnect 4800 Gbps (newer
#        revisions state the same as "bidirectional ICI 1200 GBps": 600 GB/s each way)
#   v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s, 1640 GBps, inter-chip interconnect 3584 Gbps
CHIPS = {
    "v4": Chip(bf16_flops=275e12, hbm_bytes_per_s=1200e9, ici_bytes_per_s=2400e9 / 8),
    "v5e": Chip(bf16_flops=197e12, hbm_bytes_per_s=819e9, ici_bytes_per_s=1600e9 / 8),
    "v5p": Chip(bf16_flops=459e12, hbm_bytes_per_s=2765e9, ici_bytes_per_s=4800e9 / 8),
    "v6e": Chip(bf16_flops=918e12, hbm_bytes_per_s=1640e9, ici_bytes_per_s=3584e9 / 8),
}

# jax Device.device_kind -> generation (compile-only topology devices say e.g. "TPU v5" for v5p).
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                 "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def generation_of(device: Any) -> str | None:
    """The TPU generation (a ``CHIPS`` key) of a jax device, or None for other devices (CPU, GPU, unknown TPUs)."""
    return _DEVICE_KINDS.get(getattr(device, "device_kind", ""))


def estimate(generation: str, model_flops_per_chip: float, collective_bytes_per_chip: float,
             hbm_bytes_per_chip: float | None = None) -> dict[str, Any]:
    """The step-time estimate (module docstring) for one chip of ``generation``.

    ``hbm_bytes_per_chip``: HBM bytes read and written per step (``hlo.hbm_traffic``); None leaves the HBM term out.

    Returns:
      ``generation``, the chip's ``peak_flops``, ``hbm_bytes_per_s`` and ``ici_bytes_per_s``, the terms
      ``compute_s``, ``collectives_s`` and ``hbm_s`` (None without ``hbm_bytes_per_chip``), ``step_s`` (their
      maximum), ``bound`` (the name of the largest term: compute, hbm or collectives) and ``mfu`` (compute_s /
      step_s).
    """
    if generation not in CHIPS:
        raise ValueError(f"no peak figures for TPU generation {generation!r}. Fix: use one of {sorted(CHIPS)} or "
                         "add it to mistral_jax/aot/roofline.py CHIPS.")
    chip = CHIPS[generation]
    terms = {"compute": model_flops_per_chip / chip.bf16_flops,
             "collectives": collective_bytes_per_chip / chip.ici_bytes_per_s}
    if hbm_bytes_per_chip is not None:
        terms["hbm"] = hbm_bytes_per_chip / chip.hbm_bytes_per_s
    bound = max(terms, key=terms.get)
    step = terms[bound]
    return dict(generation=generation, peak_flops=chip.bf16_flops, hbm_bytes_per_s=chip.hbm_bytes_per_s,
                ici_bytes_per_s=chip.ici_bytes_per_s, compute_s=terms["compute"], collectives_s=terms["collectives"],
                hbm_s=terms.get("hbm"), step_s=step, bound=bound, mfu=terms["compute"] / step if step > 0 else None)
