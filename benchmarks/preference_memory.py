"""Peak memory of a DPO train step at a 32k vocabulary on CPU: ``python benchmarks/preference_memory.py``.

Each side runs in its own process with its own checkout first on ``PYTHONPATH`` (``--old`` and ``--new``: two
mistral_jax trees, e.g. the main checkout before chunked sequence log-probs and this one). A side builds a small
model (``--dim`` 64, 2 layers) with a ``V = --vocab`` head, the full-fine-tuning DPO objective (reference = a frozen
copy of the initial weights, as ``configs/tiny_dpo.py``), compiles ``training.step``'s jitted train step for a
``[B, 2, T]`` pair batch on one CPU device and runs it once. One JSON line per figure and side:

* ``temp_bytes``: ``compile().memory_analysis().temp_size_in_bytes``, XLA's temporaries of the step;
* ``peak_rss_bytes``: the process's peak RSS after one step (``ru_maxrss``), ``rss_growth_bytes``: that minus the
  RSS after the state and batch were built (the step's own cost);
* ``logits_bytes`` (printed once): the size of a float32 ``[B, 2, T, V]`` tensor, for scale.

The model's ``loss_chunk_size`` is 0 (the default), so the new code uses ``training.preference.PREFERENCE_CHUNK``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_SIDE = r"""
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np, psutil
from flax import nnx
import mistral_jax as mj
from mistral_jax import sharding
from mistral_jax.training import preference as tp, step as step_lib
from mistral_jax.training.optimizer import make_optimizer
from ml_collections import ConfigDict

side, b, t, v, dim = sys.argv[1], *map(int, sys.argv[2:6])
cfg = mj.ModelConfig.tiny(vocab_size=v, dim=dim, hidden_dim=4 * dim, max_seq_len=max(1024, t), platform="cpu")
mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
rules = sharding.DEFAULT_RULES
opt = ConfigDict(dict(name="adamw", learning_rate=1e-4, schedule="constant", warmup_steps=0, min_lr_ratio=0.1,
                      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, decay_norms=False, decay_embeddings=False,
                      grad_clip_norm=1.0))
tx, schedule = make_optimizer(opt, 10)
objective = tp.PreferenceObjective(config=tp.PreferenceConfig(), pairs_per_row=1, reference="initial")
graphdef, abstract, shardings = step_lib.state_layout(nnx.eval_shape(lambda: mj.Transformer(cfg, rngs=nnx.Rngs(0))),
                                                      tx, mesh, rules, keep_initial=True)
with sharding.use_mesh(mesh, rules):
    fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, schedule=schedule, objective=objective)
    compiled = fn.lower(abstract, step_lib.abstract_batch(b, t, mesh, rules, objective)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    state = step_lib.init_state(step_lib.fresh_model(cfg, 0, mesh, rules), tx, shardings, mesh, rules,
                                keep_initial=True)
    rng = np.random.default_rng(0)
    tok = rng.integers(3, v, (b, 2, t + 1)).astype(np.int32)
    weights = np.zeros((b, 2, t), np.float32)
    weights[:, :, t // 2:] = 1.0  # the answer: the second half of each sequence
    batch = dict(tokens=tok[..., :-1], targets=tok[..., 1:], weights=weights,
                 positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, 2, t)).copy(),
                 segment_ids=np.ones((b, 2, t), np.int32), pair_mask=np.ones((b, 1), np.float32))
    jax.block_until_ready(state)
    before = psutil.Process().memory_info().rss
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
shape = f"B={b} x 2 x T={t}, V={v}"
for figure, value in (("temp_bytes", temp), ("peak_rss_bytes", peak), ("rss_growth_bytes", peak - before)):
    print(json.dumps({"side": side, "figure": figure, "value": int(value), "shape": shape, "loss": loss}))
"""


def main(argv: list[str] | None = None) -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="/work/main", help="checkout of the code before (its root on PYTHONPATH)")
    p.add_argument("--new", default=here, help="checkout of the code after")
    p.add_argument("--batch", type=int, default=4, help="pairs per batch (B)")
    p.add_argument("--seq", type=int, default=512, help="positions per sequence (T)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary (V)")
    p.add_argument("--dim", type=int, default=64, help="model width")
    args = p.parse_args(argv)
    print(json.dumps({"figure": "logits_bytes", "value": 4 * args.batch * 2 * args.seq * args.vocab,
                      "shape": f"B={args.batch} x 2 x T={args.seq}, V={args.vocab}"}), flush=True)
    for side, root in (("old", args.old), ("new", args.new)):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
        env["PYTHONPATH"] = os.path.abspath(root)
        out = subprocess.run([sys.executable, "-c", _SIDE, side, str(args.batch), str(args.seq), str(args.vocab),
                              str(args.dim)], env=env, cwd=root, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"the {side} side ({root}) failed:\n{out.stderr[-3000:]}")
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
