"""Sparse MoE layer (E experts, top-k, dropless) vs a dense SwiGLU MLP with the same active parameters.

The dense peer has hidden size k*F (k experts' worth of parameters), so both do the same matmul FLOPs per
token; the ratio shows the cost of routing, sorting and the grouped matmul. Also times the dense oracle
(all experts on all tokens). Prints one JSON line with median seconds (forward and forward+backward).
Usage: python benchmarks/moe.py [--tokens 4096] [--dim 1024] [--hidden 2048] [--experts 8] [--top_k 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from _timing import median_seconds  # noqa: E402
from flax import nnx  # noqa: E402

import mistral_jax as mj  # noqa: E402
from mistral_jax.model.moe import MoE  # noqa: E402
from mistral_jax.model.transformer import MLP  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    base = mj.ModelConfig.tiny(dim=args.dim, hidden_dim=args.hidden, num_experts=args.experts,
                               num_experts_per_tok=args.top_k)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, args.dim))
    modules = {
        "moe_ragged": MoE(base.replace(moe_impl="ragged"), rngs=nnx.Rngs(0)),
        "moe_dense_oracle": MoE(base.replace(moe_impl="dense"), rngs=nnx.Rngs(0)),
        "dense_mlp_same_active": MLP(base.replace(num_experts=0, hidden_dim=args.top_k * args.hidden),
                                     rngs=nnx.Rngs(0)),
    }
    out = {}
    for name, module in modules.items():
        graphdef, state = nnx.split(module)

        def fwd(state, x, graphdef=graphdef):
            y = nnx.merge(graphdef, state)(x)
            return y[0] if isinstance(y, tuple) else y

        fwd_bwd = jax.jit(jax.grad(lambda s, x, fwd=fwd: (fwd(s, x) ** 2).sum()))
        out[name] = {"fwd_s": median_seconds(jax.jit(fwd), state, x, repeats=args.repeats),
                     "fwd_bwd_s": median_seconds(fwd_bwd, state, x, repeats=args.repeats)}
        print(name, out[name], file=sys.stderr)
    peer = out["dense_mlp_same_active"]
    ratios = {f"{name}_vs_dense_{k}": out[name][k] / peer[k] for name in ("moe_ragged", "moe_dense_oracle")
              for k in ("fwd_s", "fwd_bwd_s")}
    print(json.dumps({"benchmark": "moe", "backend": jax.default_backend(), **vars(args), "results": out,
                      "ratios": ratios}))


if __name__ == "__main__":
    main()
