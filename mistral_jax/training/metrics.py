"""Model FLOPs, device peak, MFU, and the metrics writer (JSONL always, TensorBoard via tensorboardX).

FLOPs per trained token = ``6 * N`` (N = parameters in matmuls a token passes through: the active ones, minus the
embedding lookup unless tied) ``+ 12 * L * H * Dh * k`` for attention scores and values (forward 4*H*Dh*k per
layer, backward twice that), with ``k`` the mean number of keys a query attends to in a ``seq_len`` row:
``mean_q min(q + 1, W)`` (causal, sliding-window aware). MFU = achieved model FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.config import ModelConfig
from mistral_jax.model.transformer import count_active_params

# Dense bf16 peak FLOP/s per chip (vendor datasheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
    "B200": 2250e12, "L4": 121e12, "A10G": 125e12,
}


def mean_attended_keys(seq_len: int, window: int | None) -> float:
    """Mean over query positions of the number of keys attended (causal; sliding window W)."""
    q = np.arange(seq_len)
    keys = q + 1 if window is None else np.minimum(q + 1, window)
    return float(keys.mean())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token, attention included (see module docstring)."""
    n = count_active_params(cfg)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim  # the input embedding is a gather, not a matmul
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * mean_attended_keys(seq_len, cfg.sliding_window)
    return 6.0 * n + attn


_MEASURED: dict[str, float] = {}


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 ``n x n`` matmul on the first device (best of ``repeats``): the CPU 'peak'.

    n = 2048: on a 2-core AVX2 CPU, 1024 reached 131 GFLOP/s and 2048 166 GFLOP/s (torch's MKL: 165).
    """
    if "cpu" in _MEASURED:
        return _MEASURED["cpu"]
    dev = jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    _MEASURED["cpu"] = 2.0 * n**3 / best
    return _MEASURED["cpu"]


def peak_flops(override: float = 0.0) -> tuple[float, str]:
    """``(total peak FLOP/s of all devices, how it was obtained)``.

    Accelerators: the datasheet peak per chip times the device count. CPU: a measured float32 matmul (the
    host's cores are shared by every fake CPU device, so it is not multiplied).
    """
    if override:
        return float(override), "config.peak_flops"
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return measured_matmul_peak(), "measured CPU float32 matmul"
    kind = devices[0].device_kind
    for name, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return value * len(devices), f"datasheet {name} x {len(devices)}"
    return 0.0, f"unknown device kind {kind!r} (set config.peak_flops for MFU)"


class MetricsWriter:
    """Appends one JSON object per logged step to ``{workdir}/metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only process 0 writes. Arrays are flattened to scalars (``expert_load`` -> ``expert_load/e{i}``).
    """

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    @staticmethod
    def scalars(metrics: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in metrics.items():
            a = np.asarray(v)
            if k == "expert_load":
                if a.size:
                    for e, x in enumerate(a.reshape(-1, a.shape[-1]).mean(0)):  # mean over layers
                        out[f"expert_load/e{e}"] = float(x)
            elif a.size == 1:
                out[k] = float(a)
        return out

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
        """Log ``metrics`` at ``step`` (``prefix`` e.g. ``"eval/"``); returns the flattened scalars."""
        s = {f"{prefix}{k}": v for k, v in self.scalars(metrics).items()}
        if self.active:
            self._f.write(json.dumps({"step": int(step), **s}) + "\n")
            self._f.flush()
            if self.tb is not None:
                for k, v in s.items():
                    self.tb.add_scalar(k, v, int(step))
                self.tb.flush()
        return s

    def close(self) -> None:
        if self.active:
            self._f.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``{workdir}/metrics.jsonl`` (a resumed run appends; later records of a step win)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
