"""The metrics writer (JSONL always, TensorBoard via tensorboardX) and reader.

The model FLOPs and peaks behind the logged MFU live in ``mistral_jax.flops`` (shared with the dry run and the AOT
tool); they are re-exported here for older imports.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from mistral_jax.flops import flops_per_token, mean_attended_keys, measured_matmul_peak, peak_flops

__all__ = ["MetricsWriter", "flops_per_token", "mean_attended_keys", "measured_matmul_peak", "peak_flops",
           "read_metrics"]


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
