"""Training throughput: mistral_jax's jitted train step vs HF transformers PyTorch (eager, AdamW), same shapes.

Prints one JSON line: per model (a ~57M-parameter Mistral and a ~90M-parameter / ~57M-active Mixtral shape),
tokens/s and MFU of both, and the JAX / PyTorch ratio; medians of ``--steps`` steps after ``--warmup`` steps.
Both sides: float32, AdamW (lr 1e-4, wd 0.1), global-norm clipping 1.0, the same batch, every core (single
process). MFU counts model FLOPs (``training.metrics.flops_per_token``, attention included) against the
measured float32 matmul peak of this CPU (or the datasheet peak on an accelerator).

Each side runs in its own process, so the host allocator settings do not leak between them: ``--host_malloc
shipped`` (the default) runs the JAX side as the command-line tools run it (``host_memory.keep_freed_memory()``,
which keeps freed host memory instead of page-faulting it back every step) and PyTorch as it comes; ``same``
applies that setting to both sides, ``neither`` to none.

    python benchmarks/train_throughput.py [--batch 2 --seq 256 --steps 3 --warmup 2] [--host_malloc shipped]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import host_memory, sharding
from mistral_jax.config import ModelConfig
from mistral_jax.model.transformer import count_active_params, count_params
from mistral_jax.training import step as step_lib
from mistral_jax.training.metrics import flops_per_token, peak_flops
from mistral_jax.training.optimizer import make_optimizer

SHAPES = {
    "mistral": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, hidden_dim=1536,
                    sliding_window=4096, rope_theta=1e4, max_seq_len=4096),
    "mixtral": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, hidden_dim=1024,
                    sliding_window=None, rope_theta=1e6, max_seq_len=4096, num_experts=4, num_experts_per_tok=2),
}


def run_config(steps: int):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base

    c = base.get_config()
    c.num_steps = 1000
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.weight_decay = 1e-4, 0, 0.1
    return c


def batch_arrays(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    tok = np.random.default_rng(seed).integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    return dict(tokens=tok[:, :-1], targets=tok[:, 1:], weights=np.ones((batch, seq), np.float32),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
                segment_ids=np.ones((batch, seq), np.int32))


def jax_step_times(cfg: ModelConfig, batch: dict, steps: int, warmup: int, devices=None) -> tuple[list[float], float]:
    """Seconds of each timed train step and the last loss, on an FSDP mesh over ``devices`` (default: all)."""
    run = run_config(steps)
    mesh = sharding.make_mesh(fsdp=-1, devices=devices)
    graphdef, state, shardings = step_lib.make_train_state(cfg, run, mesh)
    tx, schedule = make_optimizer(run.optimizer, run.num_steps)
    with sharding.use_mesh(mesh):
        fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, schedule=schedule)
        b = {k: jax.device_put(jnp.asarray(v), sharding.batch_sharding(mesh)) for k, v in batch.items()}
        times, loss = [], 0.0
        for i in range(warmup + steps):
            t = time.perf_counter()
            state, m = fn(state, b)
            loss = float(m["loss"])  # blocks
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return times, loss


def torch_step_times(cfg: ModelConfig, batch: dict, steps: int, warmup: int) -> tuple[list[float], float]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf = cfg.to_hf(dtype="float32")
    hf.pop("torch_dtype", None)
    if cfg.is_moe:
        hf.update(output_router_logits=True, router_aux_loss_coef=cfg.router_aux_loss_coef)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**hf))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**hf))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.from_numpy(np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1).astype(np.int64))
    times, loss = [], 0.0
    for i in range(warmup + steps):
        t = time.perf_counter()
        out = model(input_ids=ids[:, :-1])
        logits = out.logits.float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        total = ce + (cfg.router_aux_loss_coef * out.aux_loss if cfg.is_moe and out.aux_loss is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = float(total.detach())
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times, loss


MALLOC = {"shipped": {"jax": "keep", "torch": "default"}, "same": {"jax": "keep", "torch": "keep"},
          "neither": {"jax": "default", "torch": "default"}}


def shape_config(model: str, window: int) -> ModelConfig:
    """The benchmark shape ``model``, with sliding window ``window`` (0: the shape's own)."""
    return ModelConfig(**{**SHAPES[model], **({"sliding_window": window} if window else {})})


def side(which: str, model: str, args) -> None:
    """One side of one model in this process: prints ``{"times": [...], "loss": ...}``."""
    host_memory.keep_freed_memory()  # a no-op under MISTRAL_JAX_HOST_MALLOC=default (set by the parent)
    cfg = shape_config(model, args.window)
    batch = batch_arrays(args.batch, args.seq, cfg.vocab_size)
    times, loss = (jax_step_times if which == "jax" else torch_step_times)(cfg, batch, args.steps, args.warmup)
    print(json.dumps({"times": times, "loss": loss}))


def run_side(which: str, model: str, args) -> tuple[list[float], float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", which, "--models", model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--window", str(args.window)]
    env = {**os.environ, host_memory.ENV: MALLOC[args.host_malloc][which]}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{which} side of {model} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(lines[-1])
    return r["times"], r["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default="mistral,mixtral")
    ap.add_argument("--window", type=int, default=0, help="sliding window of both shapes (0: the shape's own)")
    ap.add_argument("--host_malloc", choices=list(MALLOC), default="shipped",
                    help="host allocator settings of each side (see the module docstring)")
    ap.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)  # internal: one side, one model
    args = ap.parse_args()
    if args.side:
        return side(args.side, args.models, args)
    peak, how = peak_flops()
    out: dict = {"benchmark": "train_throughput", "device": jax.devices()[0].device_kind,
                 "n_devices": jax.device_count(),
                 "batch": args.batch, "seq": args.seq, "window": args.window or None, "steps": args.steps,
                 "warmup": args.warmup, "host_malloc": MALLOC[args.host_malloc],
                 "peak_flops": peak, "peak_source": how}
    for name in args.models.split(","):
        cfg = shape_config(name, args.window)
        tokens = args.batch * args.seq
        fpt = flops_per_token(cfg, args.seq)
        jt, jloss = run_side("jax", name, args)
        tt, tloss = run_side("torch", name, args)
        j_tps, t_tps = tokens / statistics.median(jt), tokens / statistics.median(tt)
        out[name] = {"params": count_params(cfg), "active_params": count_active_params(cfg), "flops_per_token": fpt,
                     "jax_tokens_per_s": round(j_tps, 1), "torch_tokens_per_s": round(t_tps, 1),
                     "jax_over_torch": round(j_tps / t_tps, 3),
                     "jax_mfu": round(j_tps * fpt / peak, 4) if peak else None,
                     "torch_mfu": round(t_tps * fpt / peak, 4) if peak else None,
                     "jax_step_s": [round(x, 3) for x in jt], "torch_step_s": [round(x, 3) for x in tt],
                     "jax_last_loss": round(jloss, 4), "torch_last_loss": round(tloss, 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
