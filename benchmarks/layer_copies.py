"""CPU decoding with and without per-layer weight copies (``generate(unstack=...)``, ``inference/per_layer.py``).

    python benchmarks/layer_copies.py [--prompt_len 384] [--new_tokens 128] [--repeats 5]

XLA's CPU backend copies a scanned layer's weights out of the stacked ``[L, ...]`` arrays on every call;
``generate`` therefore copies the layers out once on CPU (``unstack=None`` picks it when the copy fits). This runs
``mj.generate`` at batch 1 on the model of ``benchmarks/decode.py`` (~60M Mistral, W=256, float32, greedy, EOS
disabled) with ``unstack=False`` and ``unstack=True``. Decode tokens/s = ``(new_tokens - 1)`` over the median time
of a ``new_tokens`` generation minus the median time of a one-token one (prefill, plus the copy when unstacked);
the two sides alternate within each repeat. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decode import CONFIG  # noqa: E402  (this directory: the decode benchmark's model)

import mistral_jax as mj  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt_len", type=int, default=384)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from flax import nnx

    model = mj.Transformer(CONFIG, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(1).integers(3, CONFIG.vocab_size, (1, args.prompt_len)).astype(np.int32)
    prompt[:, 0] = 1

    def seconds(n: int, unstack: bool) -> float:
        t = time.perf_counter()
        mj.generate(model, prompt, max_new_tokens=n, eos_id=None, unstack=unstack)
        return time.perf_counter() - t

    sides = (False, True)
    for unstack in sides:
        seconds(args.new_tokens, unstack)  # warm-up: compiles every shape
        seconds(1, unstack)
    times = {u: ([], []) for u in sides}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of a shared machine hits both sides
        for unstack in sides:
            times[unstack][0].append(seconds(1, unstack))
            times[unstack][1].append(seconds(args.new_tokens, unstack))
    out = {}
    for unstack, (firsts, fulls) in times.items():
        first, full = statistics.median(firsts), statistics.median(fulls)
        out[f"unstack_{unstack}"] = dict(first_token_s=round(first, 3), total_s=round(full, 3),
                                         decode_tok_s=round((args.new_tokens - 1) / (full - first), 1))
    ratio = out["unstack_True"]["decode_tok_s"] / out["unstack_False"]["decode_tok_s"]
    print(json.dumps(dict(benchmark="layer_copies", device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                          params=mj.count_params(CONFIG), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          repeats=args.repeats, **out, decode_ratio=round(ratio, 2))))


if __name__ == "__main__":
    main()
