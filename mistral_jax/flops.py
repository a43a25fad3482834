"""Model FLOPs of a train step and the chips' peak figures: the one count behind the dry run, the AOT tool's
roofline and the MFU that training logs (``metrics.jsonl``).

FLOPs per trained token = ``6 * N`` (N = parameters in matmuls a token passes through: the active ones, minus the
embedding lookup unless tied) ``+ 12 * L * H * Dh * k`` for attention scores and values (forward 4*H*Dh*k per
layer, backward twice that), with ``k`` the mean number of keys a query attends to in a ``seq_len`` row:
``mean_q min(q + 1, W)`` (causal, sliding-window aware). MFU = model FLOP/s / peak FLOP/s.

``CHIPS`` is the one peak table: dense bf16 FLOP/s per chip (vendor datasheets), and for TPUs the HBM and ICI
bandwidths the AOT roofline (``aot.roofline``) divides by. ``chip_of(device)`` maps a jax device to its row.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mistral_jax.config import ModelConfig
from mistral_jax.model.transformer import count_active_params


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip peaks."""

    bf16_flops: float  # dense FLOP/s
    hbm_bytes_per_s: float | None = None  # None: not used (the roofline is for TPUs)
    ici_bytes_per_s: float | None = None  # the "interchip interconnect BW" figure (Gbps / 8)


# TPUs: Google Cloud TPU system architecture pages (the per-chip key specifications tables):
#   v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, HBM2 1200 GBps; the page gives no ICI figure:
#        2400 Gbps = 6 ICI links x 400 Gbps per direction (https://glennklockwood.com/garden/processors/TPUv4)
#   v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s, 819 GBps, interchip interconnect 1600 Gbps
#   v5p: https://cloud.google.com/tpu/docs/v5p-training  459 TFLOP/s, 2765 GBps, interchip interconnect 4800 Gbps
#        (newer revisions state the same as "bidirectional ICI 1200 GBps": 600 GB/s each way)
#   v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s, 1640 GBps, inter-chip interconnect 3584 Gbps
# GPUs: NVIDIA datasheets, dense bf16 (no sparsity).
CHIPS: dict[str, Chip] = {
    "v4": Chip(bf16_flops=275e12, hbm_bytes_per_s=1200e9, ici_bytes_per_s=2400e9 / 8),
    "v5e": Chip(bf16_flops=197e12, hbm_bytes_per_s=819e9, ici_bytes_per_s=1600e9 / 8),
    "v5p": Chip(bf16_flops=459e12, hbm_bytes_per_s=2765e9, ici_bytes_per_s=4800e9 / 8),
    "v6e": Chip(bf16_flops=918e12, hbm_bytes_per_s=1640e9, ici_bytes_per_s=3584e9 / 8),
    "H100": Chip(bf16_flops=989e12), "H200": Chip(bf16_flops=989e12), "H800": Chip(bf16_flops=989e12),
    "H100 PCIe": Chip(bf16_flops=756e12), "H100 NVL": Chip(bf16_flops=835e12),  # "H100" above is the SXM part
    "A100": Chip(bf16_flops=312e12), "B200": Chip(bf16_flops=2250e12), "L4": Chip(bf16_flops=121e12),
    "A10G": Chip(bf16_flops=125e12),
}

# jax Device.device_kind (a substring of it; the longest match wins) -> CHIPS key. Compile-only topology devices
# say e.g. "TPU v5" for v5p and "TPU v5 lite" for v5e.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e", **{k: k for k in ("H100", "H200", "H800", "A100", "B200",
                                                                           "L4", "A10G", "H100 PCIe", "H100 NVL")}}


def chip_of(device: Any) -> str | None:
    """The ``CHIPS`` key of a jax device, or None (CPU, unknown accelerators)."""
    kind = getattr(device, "device_kind", "") or ""
    if getattr(device, "platform", "") == "cpu":
        return None
    for name in sorted(DEVICE_KINDS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return DEVICE_KINDS[name]
    return None


def mean_attended_keys(seq_len: int, window: int | None) -> float:
    """Mean over query positions of the number of keys attended (causal; sliding window W)."""
    q = np.arange(seq_len)
    keys = q + 1 if window is None else np.minimum(q + 1, window)
    return float(keys.mean())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token, attention included (see the module docstring)."""
    n = count_active_params(cfg)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim  # the input embedding is a gather, not a matmul
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * mean_attended_keys(seq_len, cfg.sliding_window)
    return 6.0 * n + attn


def flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one train step of ``batch_size`` rows of ``seq_len`` tokens (all devices together)."""
    return flops_per_token(cfg, seq_len) * batch_size * seq_len


_MEASURED: dict[str, float] = {}


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``n x n`` matmul on the first device (best of ``repeats``): the CPU 'peak'.

    n = 2048: a smaller matmul under-reads the machine (docs/benchmarks.md#cpu-matmul-peak-at-n-2048).
    """
    if "cpu" in _MEASURED:
        return _MEASURED["cpu"]
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    _MEASURED["cpu"] = 2.0 * n**3 / best
    return _MEASURED["cpu"]


def peak_flops(override: float = 0.0, devices: Sequence[Any] | None = None) -> tuple[float, str]:
    """``(total peak FLOP/s of ``devices`` (default: every global device), how it was obtained)``.

    Accelerators: the ``CHIPS`` peak per chip times the device count. CPU: a measured float32 matmul (the
    host's cores are shared by every fake CPU device, so it is not multiplied). 0 for an unknown device kind.
    """
    if override:
        return float(override), "config.peak_flops"
    if devices is None:
        import jax

        devices = jax.devices()
    if devices[0].platform == "cpu":
        return measured_matmul_peak(), "measured CPU float32 matmul"
    chip = chip_of(devices[0])
    if chip is None:
        return 0.0, f"unknown device kind {devices[0].device_kind!r} (set config.peak_flops for MFU)"
    return CHIPS[chip].bf16_flops * len(devices), f"datasheet {chip} x {len(devices)}"
