"""Prefill and decode tokens/s of mistral_jax vs HF transformers' PyTorch ``generate`` on the same model.

    python benchmarks/decode.py [--batch_sizes 1,8] [--prompt_len 384] [--new_tokens 128] [--repeats 3]
                                [--device cpu|cuda] [--dtype float32|bfloat16]

Both run the same random ~60M-parameter Mistral shape (vocab 32000, dim 512, 8 layers, GQA 8/2, window 256)
in ``--dtype`` (weights and compute; default float32), greedy, EOS disabled, in one process: ours on JAX's default
device, HF on torch device ``--device`` (default cpu; ``cuda`` for a GPU, where JAX then does not preallocate GPU
memory, so both fit). HF gets the weights through ``mj.save_hf`` + ``AutoModelForCausalLM.from_pretrained`` (sdpa
attention, its default). ``scripts/gpu_check.sh`` runs ``compare`` on a GPU.

Timing (medians of ``--repeats`` after one warm-up that compiles):
  * prefill: ours = per-layer weight copies on CPU (``per_layer.serving_layers``) + chunked prefill + first sample;
    HF = ``generate(max_new_tokens=1)``.
    prefill tokens/s = batch * prompt_len / time.
  * decode: ours = the remaining ``new_tokens - 1`` steps (device loop, one host sync per 32 steps);
    HF = ``generate(max_new_tokens=new_tokens)`` time minus its prefill time.
    decode tokens/s = batch * (new_tokens - 1) / time.
Prints one JSON line with both sides and the ratios (ours / HF), plus whether the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mistral_jax as mj  # noqa: E402
from mistral_jax.inference import decode as gen  # noqa: E402
from mistral_jax.inference import per_layer  # noqa: E402

CONFIG = mj.ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1792,
                        sliding_window=256, rope_theta=1e4, max_seq_len=4096)


def ours_run(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, decode seconds, tokens [B, new_tokens]) for one greedy generation."""
    from flax import nnx

    cfg = model.cfg
    b, t = prompts.shape
    graphdef, state = nnx.split(model)
    cache = gen.KVCache.init(cfg, b, gen.cache_length(cfg, t + new_tokens))
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    key = jax.random.key(0)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    layers = jax.block_until_ready(per_layer.serving_layers(model, state=state))  # as generate() does, once per call
    logits, cache = gen.prefill(graphdef, state, cache, prompts, positions, layers=layers)
    tok = gen._sample(logits, key, temperature=0.0, top_k=None, top_p=None)
    tok.block_until_ready()
    mid = time.perf_counter()
    pos, done = jnp.full((b,), t, jnp.int32), jnp.zeros((b,), bool)
    out, step = [np.asarray(tok)[:, None]], 1
    while step < new_tokens:
        block, taken, cache, tok, pos, done = gen._decode_loop(
            graphdef, state, cache, tok, pos, done, key, jnp.int32(step), jnp.int32(new_tokens - step),
            block=gen.DECODE_BLOCK, temperature=0.0, top_k=None, top_p=None, eos_id=gen.NO_EOS, pad_id=0,
            layers=layers)
        taken = int(taken)  # host sync, as generate() does once per block
        out.append(np.asarray(block)[:, :taken])
        step += taken
    end = time.perf_counter()
    return mid - start, end - mid, np.concatenate(out, axis=1)


def load_hf(model, device: str = "cpu"):
    """HF transformers' model with ``model``'s weights (``mj.save_hf`` + ``from_pretrained``) in its parameter
    dtype on torch ``device``, EOS disabled."""
    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[model.cfg.param_dtype]
    with tempfile.TemporaryDirectory() as d:
        mj.save_hf(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    return hf


def hf_run(hf, prompts: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
    import torch

    ids = torch.from_numpy(prompts).long().to(hf.device)
    sync = torch.cuda.synchronize if hf.device.type == "cuda" else (lambda: None)  # CUDA calls return early
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync()
        mid = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync()
        end = time.perf_counter()
    prefill = mid - start
    return prefill, (end - mid) - prefill, out[:, prompts.shape[1]:].cpu().numpy()


def compare(model, hf, batch_sizes, prompt_len: int, new_tokens: int, repeats: int) -> list[dict]:
    """Per batch size: prefill and decode tokens/s of ``model`` (ours) and ``hf``, their ratios (ours / HF) and
    the fraction of greedy tokens that agree."""
    rows = []
    for b in batch_sizes:
        prompts = np.random.default_rng(b).integers(3, model.cfg.vocab_size, (b, prompt_len)).astype(np.int32)
        prompts[:, 0] = 1
        ours_run(model, prompts, new_tokens)  # warm-up: compiles every shape
        hf_run(hf, prompts, 4)
        ours = [ours_run(model, prompts, new_tokens) for _ in range(repeats)]
        ref = [hf_run(hf, prompts, new_tokens) for _ in range(repeats)]
        med = lambda runs, i: statistics.median(r[i] for r in runs)
        n_prefill, n_decode = b * prompt_len, b * (new_tokens - 1)
        row = dict(
            batch=b,
            ours_prefill_tok_s=round(n_prefill / med(ours, 0), 1), hf_prefill_tok_s=round(n_prefill / med(ref, 0), 1),
            ours_decode_tok_s=round(n_decode / med(ours, 1), 1), hf_decode_tok_s=round(n_decode / med(ref, 1), 1),
            greedy_tokens_agree=float(np.mean(ours[0][2] == ref[0][2])),
        )
        row["prefill_ratio"] = round(row["ours_prefill_tok_s"] / row["hf_prefill_tok_s"], 2)
        row["decode_ratio"] = round(row["ours_decode_tok_s"] / row["hf_decode_tok_s"], 2)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch_sizes", default="1,8")
    ap.add_argument("--prompt_len", type=int, default=384)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="torch device of the HF side: cpu or cuda")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute")
    args = ap.parse_args()
    if args.device != "cpu":  # JAX would otherwise take 75% of the GPU's memory before torch gets any
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import torch
    from flax import nnx

    cfg = CONFIG.replace(dtype=args.dtype, param_dtype=args.dtype)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    hf = load_hf(model, args.device)
    rows = compare(model, hf, [int(x) for x in args.batch_sizes.split(",")], args.prompt_len, args.new_tokens,
                   args.repeats)
    print(json.dumps(dict(
        benchmark="decode", device=str(jax.devices()[0].device_kind), torch_device=args.device, jax=jax.__version__,
        torch=torch.__version__, torch_threads=torch.get_num_threads(), params=mj.count_params(cfg),
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, window=cfg.sliding_window, repeats=args.repeats,
        dtype=args.dtype, results=rows,
    )))


if __name__ == "__main__":
    main()
