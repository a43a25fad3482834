"""Sliding-window attention (blocked banded backend) vs full causal attention, forward and forward+backward.

Prints one JSON line: per N, the median seconds of each and the ratio SWA / full causal. The peer is the
reference masked attention with a causal mask (what XLA runs when nothing skips the masked work).
Usage: python benchmarks/attention.py [--lengths 4096,8192,16384] [--window 4096] [--heads 1] [--head_dim 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _timing import median_seconds  # noqa: E402

from mistral_jax.model import attention as attn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full_max", type=int, default=16384, help="skip full causal above this N (memory: N^2 floats)")
    args = ap.parse_args()

    results = {}
    for n in map(int, args.lengths.split(",")):
        key = jax.random.key(n)
        shape = (1, n, args.heads, args.head_dim)
        q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in jax.random.split(key, 3))
        pos = jnp.arange(n)[None]

        def swa(q, k, v, pos=pos):
            return attn.blocked_attention(q, k, v, pos, None, args.window, args.block)

        def full(q, k, v, pos=pos):
            return attn.reference_attention(q, k, v, attn.make_mask(pos, pos, window=None))

        row = {}
        for name, fn in (("swa", swa), ("full_causal", full)):
            if name == "full_causal" and n > args.full_max:
                row[name] = None
                continue
            fwd = jax.jit(fn)
            fwd_bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).sum(), argnums=(0, 1, 2)))
            row[name] = {"fwd_s": median_seconds(fwd, q, k, v, repeats=args.repeats),
                         "fwd_bwd_s": median_seconds(fwd_bwd, q, k, v, repeats=args.repeats)}
        if row["full_causal"]:
            row["ratio_fwd"] = row["swa"]["fwd_s"] / row["full_causal"]["fwd_s"]
            row["ratio_fwd_bwd"] = row["swa"]["fwd_bwd_s"] / row["full_causal"]["fwd_bwd_s"]
        results[n] = row
        print(f"N={n}: {row}", file=sys.stderr)

    ns = sorted(results)
    growth = {f"{a}->{b}": results[b]["swa"]["fwd_bwd_s"] / results[a]["swa"]["fwd_bwd_s"]
              for a, b in zip(ns, ns[1:], strict=False)}
    print(json.dumps({"benchmark": "attention", "window": args.window, "block": args.block, "heads": args.heads,
                      "head_dim": args.head_dim, "backend": jax.default_backend(), "results": results,
                      "swa_fwd_bwd_growth": growth}))


if __name__ == "__main__":
    main()
