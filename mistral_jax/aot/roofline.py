"""A roofline lower bound on the train step's time per chip, from the chip's published peak figures.

Terms, each a time per step on one chip:

- compute = model FLOPs per chip / peak bf16 FLOP/s (``flops.flops_per_step``: 6 N tokens + attention, the MFU
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
buffers the compiler keeps in VMEM; see docs/benchmarks.md#hbm-traffic-against-xlas-tpu-cost-model). It is a
lower bound on the step time; the MFU it implies (compute term / estimate) is an upper bound.
"""

from __future__ import annotations

from typing import Any

from mistral_jax import flops

# The one peak table (``mistral_jax.flops.CHIPS``; the dry run and training's MFU read the same figures).
CHIPS = {k: v for k, v in flops.CHIPS.items() if v.hbm_bytes_per_s is not None}  # the TPU generations


def generation_of(device: Any) -> str | None:
    """The TPU generation (a ``CHIPS`` key) of a jax device, or None for other devices (CPU, GPU, unknown TPUs)."""
    chip = flops.chip_of(device)
    return chip if chip in CHIPS else None


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
                         "add it to mistral_jax/flops.py CHIPS.")
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
