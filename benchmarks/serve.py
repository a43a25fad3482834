"""Serving throughput and time to first token: the HTTP server (continuous batching) vs sequential ``mj.generate``
and vs HF transformers' PyTorch ``generate`` on the same model and prompts.

    python benchmarks/serve.py [--preset small|tiny] [--requests 16] [--prompt_len 128] [--new_tokens 64]
        [--concurrency 1,4,16] [--max_batch 16]

One random model (``small``: decode.py's ~60M Mistral shape, vocab 32000, window 256; ``tiny``: ModelConfig.tiny),
float32, greedy, EOS ignored so every request produces exactly ``--new_tokens`` tokens. The same ``--requests``
prompts (token ids, lengths uniform in [prompt_len / 2, prompt_len]) go through:

* sequential ``mj.generate``: one prompt after the other (after a warm-up pass that compiles every shape);
  output tokens/s = all new tokens / total time; TTFT = median time of ``generate(max_new_tokens=1)``.
* HF transformers ``generate`` (the same weights through ``mj.save_hf``, float32, sdpa attention), one prompt
  after the other (``hf_sequential``) and all prompts as one left-padded static batch (``hf_batch``: the best
  throughput a client of ``generate`` gets, every request waiting for the whole batch); TTFT = median time of
  ``generate(max_new_tokens=1)`` per prompt, and the batch's ``max_new_tokens=1`` time for ``hf_batch``.
* the server (``mistral_jax.serve`` on 127.0.0.1, a free port, in this process) at each concurrency c: c client
  threads send the prompts as streaming ``/v1/completions`` requests; output tokens/s = all new tokens / wall time
  of the whole batch; TTFT = median time from sending a request to its first streamed chunk (queueing included).

Greedy outputs of every side are compared token for token with sequential ``mj.generate``. Prints one JSON line,
with the XLA compilations the server made after its warm-up (0 expected: shapes are fixed).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mistral_jax as mj  # noqa: E402

SMALL = dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1792,
             sliding_window=256, rope_theta=1e4, max_seq_len=4096)
REQUEST_TIMEOUT = 600  # seconds per HTTP request


class IdsTokenizer:
    """The engine needs ``eos_id`` and text for the answer; ids as text keep the benchmark tokenizer-free."""

    eos_id, bos_id = 2, 1

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def sequential(model, prompts, new_tokens):
    for p in prompts:  # warm-up: compile every prompt-length bucket
        mj.generate(model, p, max_new_tokens=new_tokens, eos_id=None)
        mj.generate(model, p, max_new_tokens=1, eos_id=None)
    outs, start = [], time.perf_counter()
    for p in prompts:
        outs.append(mj.generate(model, p, max_new_tokens=new_tokens, eos_id=None))
    total = time.perf_counter() - start
    ttft = []
    for p in prompts:
        t = time.perf_counter()
        mj.generate(model, p, max_new_tokens=1, eos_id=None)
        ttft.append(time.perf_counter() - t)
    return outs, len(prompts) * new_tokens / total, statistics.median(ttft)


def hf_sequential(hf, prompts, new_tokens):
    """(outputs, tokens/s, median TTFT) of HF ``generate`` one prompt at a time."""
    import torch

    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    run = lambda p, n: hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, **kw)[0, len(p):].tolist()
    with torch.inference_mode():
        run(prompts[0], 2)  # warm-up
        start = time.perf_counter()
        outs = [run(p, new_tokens) for p in prompts]
        total = time.perf_counter() - start
        ttft = []
        for p in prompts:
            t = time.perf_counter()
            run(p, 1)
            ttft.append(time.perf_counter() - t)
    return outs, len(prompts) * new_tokens / total, statistics.median(ttft)


def hf_batch(hf, prompts, new_tokens):
    """(outputs, tokens/s, TTFT) of HF ``generate`` on all prompts as one left-padded batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=mask)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - start
    return out[:, width:].tolist(), len(prompts) * new_tokens / total, ttft


def load_hf(model):
    import tempfile

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as d:
        mj.save_hf(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf


def _agree(outs, ref):
    """Fraction of generated tokens equal to the reference's, position by position."""
    pairs = [(a, b) for o, r in zip(outs, ref, strict=True) for a, b in zip(o, r, strict=True)]
    return round(sum(a == b for a, b in pairs) / max(len(pairs), 1), 4)


def one_request(url, prompt, new_tokens):
    """Stream one completion; returns (seconds to the first chunk, token ids from the text, completion tokens)."""
    import requests

    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    start, first, text, usage = time.perf_counter(), None, [], None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            if first is None:
                first = time.perf_counter() - start
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            text.append(chunk["choices"][0]["text"])
            usage = chunk.get("usage") or usage
    return first, [int(x) for x in "".join(text).split()], usage["completion_tokens"]


def served(url, prompts, new_tokens, concurrency):
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda p: one_request(url, p, new_tokens), prompts, timeout=REQUEST_TIMEOUT * 2))
    wall = time.perf_counter() - start
    return [r[1] for r in res], sum(r[2] for r in res) / wall, statistics.median(r[0] for r in res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=["small", "tiny"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max_batch", type=int, default=16)
    args = ap.parse_args()
    from mistral_jax.cli import quiet_libraries

    quiet_libraries()
    if not 1 <= args.requests <= 256 or not 2 <= args.prompt_len <= 2048 or not 1 <= args.new_tokens <= 1024:
        ap.error("bounded run: --requests in [1, 256], --prompt_len in [2, 2048], --new_tokens in [1, 1024]")
    from flax import nnx

    from mistral_jax.serve.app import Server, create_app
    from mistral_jax.serve.engine import Engine, compile_count

    cfg = mj.ModelConfig(**SMALL) if args.preset == "small" else mj.ModelConfig.tiny(initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, cfg.vocab_size, int(rng.integers(args.prompt_len // 2, args.prompt_len))
                                  ).tolist() for _ in range(args.requests)]

    seq_out, seq_tps, seq_ttft = sequential(model, prompts, args.new_tokens)
    hf = load_hf(model)
    hf_seq_out, hf_seq_tps, hf_seq_ttft = hf_sequential(hf, prompts, args.new_tokens)
    hf_b_out, hf_b_tps, hf_b_ttft = hf_batch(hf, prompts, args.new_tokens)
    del hf

    compile_count()
    engine = Engine(model, IdsTokenizer(), max_batch=args.max_batch, max_queue=max(args.requests, 1)).start()
    server = Server(create_app(engine, "bench")).start()
    warm = compile_count()
    rows, same = {}, True
    try:
        one_request(server.url, prompts[0], 2)  # first HTTP round trip
        for c in (int(x) for x in args.concurrency.split(",")):
            out, tps, ttft = served(server.url, prompts, args.new_tokens, c)
            same &= out == seq_out
            rows[f"c{c}"] = dict(tokens_per_s=round(tps, 1), ttft_ms=round(ttft * 1e3, 1),
                                 speedup_vs_sequential=round(tps / seq_tps, 2),
                                 speedup_vs_hf_sequential=round(tps / hf_seq_tps, 2),
                                 speedup_vs_hf_batch=round(tps / hf_b_tps, 2))
    finally:
        server.stop()
        engine.stop()
    print(json.dumps(dict(
        benchmark="serve", backend=__import__("jax").default_backend(), preset=args.preset,
        requests=args.requests, prompt_len=f"{args.prompt_len // 2}-{args.prompt_len}", new_tokens=args.new_tokens,
        max_batch=args.max_batch, cache_slots=engine.cache_slots, prefill_chunk=engine.chunk,
        sequential_generate=dict(tokens_per_s=round(seq_tps, 1), ttft_ms=round(seq_ttft * 1e3, 1)),
        hf_sequential=dict(tokens_per_s=round(hf_seq_tps, 1), ttft_ms=round(hf_seq_ttft * 1e3, 1),
                           greedy_agree=_agree(hf_seq_out, seq_out)),
        hf_batch=dict(tokens_per_s=round(hf_b_tps, 1), ttft_ms=round(hf_b_ttft * 1e3, 1),
                      greedy_agree=_agree(hf_b_out, seq_out)),
        torch_threads=__import__("torch").get_num_threads(),
        server=rows, greedy_equal=same, compiles_after_warmup=compile_count() - warm,
        engine=dict(decode_steps=engine.steps["decode_steps"], prefill_chunks=engine.steps["prefill_chunks"],
                    peak_rows=engine.steps["peak_rows"]))))


if __name__ == "__main__":
    main()
