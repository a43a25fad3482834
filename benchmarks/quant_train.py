"""Quantized training (``ModelConfig.matmul_quant``, qwix) against bfloat16 training: the demo run
(``configs/tiny.py``: the tiny Mistral on the bundled corpus), same data, seed and steps, bfloat16 compute in every
mode; only the decoder layers' weight matmuls change (int8 / fp8 operands and gradients).

Prints one JSON line per mode and seed: the held-out loss after the last step (``eval_loss``, 8 x 16 x 64 tokens),
the mean training loss of the last 50 logged steps (``train_loss``), both as ratios to the bfloat16 run of the
same seed (``eval_vs_bf16``, ``train_vs_bf16``), and the wall seconds of the run (compile included).

    python benchmarks/quant_train.py [--steps 300] [--modes none,int8,fp8] [--seeds 0,1,2] [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import tiny  # noqa: E402
from mistral_jax import host_memory  # noqa: E402
from mistral_jax.training import trainer  # noqa: E402
from mistral_jax.training.metrics import read_metrics  # noqa: E402


def config(mode: str, steps: int, seed: int, tokenizer: str):
    """The demo run with bfloat16 compute and ``matmul_quant=mode`` for ``steps`` steps (eval and checkpoint at
    the end only)."""
    c = tiny.get_config()
    c.seed = seed
    c.num_steps = steps
    c.model.dtype = "bfloat16"
    c.model.matmul_quant = mode
    c.data.tokenizer = tokenizer  # "" = each run trains the same 512-piece tokenizer on the corpus
    c.eval_every = steps
    c.checkpoint.every_steps = steps
    c.log_every = 1
    c.progress_bar = False
    return c


def train_losses(workdir: str) -> list[float]:
    """The training losses of a run's ``metrics.jsonl``, in step order."""
    losses = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
    return [losses[s] for s in sorted(losses)]


def run(mode: str, steps: int, seed: int, tokenizer: str, root: str) -> dict:
    workdir = os.path.join(root, f"{mode}_{seed}")
    t = time.perf_counter()
    out = trainer.train(config(mode, steps, seed, tokenizer), workdir)
    seconds = time.perf_counter() - t
    losses = train_losses(workdir)
    return {"mode": mode, "seed": seed, "steps": steps, "eval_loss": out["eval"]["eval/loss"],
            "train_loss": statistics.fmean(losses[-50:]), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--modes", default="none,int8,fp8", help="matmul_quant modes; 'none' (bfloat16) is the peer")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tokenizer", default="", help="a sentencepiece model; '' = train the demo's")
    args = ap.parse_args(argv)
    host_memory.keep_freed_memory()
    modes = ["none"] + [m for m in args.modes.split(",") if m != "none"]
    with tempfile.TemporaryDirectory() as root:
        for seed in (int(s) for s in args.seeds.split(",")):
            base = None
            for mode in modes:
                r = run(mode, args.steps, seed, args.tokenizer, root)
                base = base or r
                r.update(figure="quant_train", eval_vs_bf16=round(r["eval_loss"] / base["eval_loss"], 4),
                         train_vs_bf16=round(r["train_loss"] / base["train_loss"], 4))
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
