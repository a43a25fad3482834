"""Serving under load: the OpenAI-compatible server (continuous batching) driven by the official ``openai`` client
at several concurrencies, against sequential ``mj.generate`` and HF transformers' static-batch ``generate``.

    python benchmarks/serve_load.py [--preset tiny|small] [--concurrency 1,4,16,64] [--requests 16]
        [--prompt_len 128] [--new_tokens 48] [--repeats 3] [--max_batch 16]
    python benchmarks/serve_load.py --prefix [--preset small] [--prefix_len 2048]
    python benchmarks/serve_load.py --overload [--preset tiny] [--overload_clients 256] [--max_queue 32]
        [--overload_tokens 8]

One random model (``small``: decode.py's ~60M Mistral shape, vocab 32000, window 256; ``tiny``: ModelConfig.tiny),
float32, greedy, EOS ignored (``extra_body={"ignore_eos": True}``) so every request produces exactly
``--new_tokens`` tokens. Prompts are token ids, lengths uniform in [prompt_len / 2, prompt_len). At concurrency c
the first ``max(--requests, c)`` prompts go through each side; every side is timed ``--repeats`` times, the sides
interleaved within each repeat (sequential generate, HF, then the server at every c), and each figure is the median
over repeats with its [min, max]. Ratios pair the server with its peer of the same repeat.

Sides:

* server: ``mistral_jax.serve`` on 127.0.0.1 (a free port, in this process; ``--max_batch`` decode slots; the
  prefix cache off, since every repeat sends the same prompts). c client threads (in this process, or with
  ``--client_process`` in one of their own, where they do not hold the server's interpreter lock) share the
  requests; each is a streaming ``client.completions.create(prompt=<ids>, max_tokens=N,
  temperature=0, stream=True)``.
* sequential ``mj.generate``: one prompt after the other, after a warm-up that compiles every prompt bucket.
* HF transformers ``generate`` (the same weights through ``mj.save_hf``, float32): static left-padded batches of
  c prompts (c = 1: one prompt at a time), every request waiting for its whole batch.

Figures (one JSON line each, per concurrency c):

* ``tokens_per_s``: all new tokens / wall time of the level (server: first request sent to last stream closed;
  peers: the sum of their calls on the same prompts).
* ``ttft_ms``: p50 / p99 over the level's requests of send -> first streamed chunk carrying text (queueing
  included). Peer: p50 of ``mj.generate(max_new_tokens=1)``.
* ``itl_ms``: p50 / p99 of the inter-token latency: the gaps between successive text-carrying chunks of a request,
  a gap divided by the tokens its chunk carries, counted once per token. Tokens per chunk are counted from the
  chunk's text (the benchmark's IdsTokenizer writes each token as " <id>"), and their sum is checked against the
  stream's ``usage.completion_tokens``. Peer: the mean, (all generate(N) time - all generate(1) time) /
  (requests * (N - 1)).
* ``ratio_vs_sequential_generate``, ``ratio_vs_hf_static_batch``: server tokens/s over the peer's.
* ``overhead_ms`` (c = 1 only): per request, server latency (send -> stream closed) minus ``mj.generate``'s time
  for the same prompt in the same repeat; the median over requests. Everything the server adds: HTTP, SSE, the
  engine loop, and its B-row decode step against generate's one row.
* ``greedy_equal``: the server's tokens equal sequential ``mj.generate``'s, token for token, in every repeat (and
  HF's agreement, a fraction of positions).
* ``run``: set-up, XLA compilations the server made after its warm-up (0 expected), wall time of the script.

Goals (fields ``goal`` / ``met``): c = 1 at >= 0.9x sequential generate; c = 16 at >= 1.2x HF's static batch of 16;
overhead <= 5 ms per request.

``--overload``: ``--overload_clients`` clients at once (a barrier) against a server with ``--max_queue`` waiting
places, each one streaming request of ``--overload_tokens`` tokens, no client retries, a timeout per request.
Prints one line: HTTP status counts, how many 429s carried ``Retry-After``, timeouts (a hang), whether the engine
drained and still answers afterwards.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mistral_jax as mj  # noqa: E402

SMALL = dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1792,
             sliding_window=256, rope_theta=1e4, max_seq_len=4096)
REQUEST_TIMEOUT = 300  # seconds per HTTP request
MODEL_NAME = "bench"
GOALS = dict(seq_c=1, seq_ratio=0.9, hf_c=16, hf_ratio=1.2, overhead_ms=5.0)


class IdsTokenizer:
    """The engine needs ``eos_id`` and text for the answer; ids as text keep the benchmark tokenizer-free."""

    eos_id, bos_id = 2, 1

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def summary(values, nd=2):
    """Median and [min, max] over repeats."""
    return dict(median=round(statistics.median(values), nd), range=[round(min(values), nd), round(max(values), nd)])


def pct(xs, q):
    return float(np.percentile(np.asarray(xs, np.float64), q))


# ----------------------------------------------------------------------------- peers
def warm_generate(model, prompts, new_tokens):
    """Compile ``mj.generate`` for every (prompt bucket, cache size) the prompts use, for N and 1 new tokens."""
    from mistral_jax.inference.decode import cache_length, default_chunk_size, padded_prompt_length

    chunk, seen = default_chunk_size(model.cfg), set()
    for p in prompts:
        for n in (new_tokens, 1):
            key = (padded_prompt_length(len(p), chunk), cache_length(model.cfg, len(p) + n), n)
            if key not in seen:
                seen.add(key)
                mj.generate(model, p, max_new_tokens=n, eos_id=None)


def sequential(model, prompts, new_tokens):
    """Per prompt: (outputs, seconds of generate(N), seconds of generate(1))."""
    outs, t_n, t_1 = [], [], []
    for p in prompts:
        t = time.perf_counter()
        outs.append(mj.generate(model, p, max_new_tokens=new_tokens, eos_id=None))
        t_n.append(time.perf_counter() - t)
    for p in prompts:
        t = time.perf_counter()
        mj.generate(model, p, max_new_tokens=1, eos_id=None)
        t_1.append(time.perf_counter() - t)
    return outs, t_n, t_1


def load_hf(model):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        mj.save_hf(model, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf


def hf_static(hf, prompts, new_tokens, batch):
    """(outputs, seconds) of HF ``generate`` on ``prompts`` in static left-padded batches of ``batch``."""
    import torch

    outs, total = [], 0.0
    with torch.inference_mode():
        for s in range(0, len(prompts), batch):
            group = prompts[s:s + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            t = time.perf_counter()
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            total += time.perf_counter() - t
            outs += out[:, width:].tolist()
    return outs, total


def agree(outs, ref):
    """Fraction of generated tokens equal to the reference's, position by position."""
    pairs = [(a, b) for o, r in zip(outs, ref, strict=True) for a, b in zip(o, r, strict=True)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


# ----------------------------------------------------------------------------- the server side
def one_request(client, prompt, new_tokens):
    """Stream one completion: dict(ttft, latency, itl samples, token ids, completion_tokens)."""
    start = time.perf_counter()
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    first = last = None
    ids, itl, usage = [], [], None
    for chunk in stream:
        now = time.perf_counter()
        usage = chunk.usage or usage
        text = "".join(c.text or "" for c in chunk.choices)
        if not text:
            continue
        k = len(text.split())  # tokens in this chunk (IdsTokenizer: " <id>" per token)
        ids += [int(x) for x in text.split()]
        if first is None:
            first = now - start
        else:
            itl += [(now - last) / k] * k
        last = now
    latency = time.perf_counter() - start
    n = usage.completion_tokens if usage is not None else len(ids)
    if n != len(ids):
        raise RuntimeError(f"usage says {n} completion tokens, the streamed text holds {len(ids)}")
    return dict(ttft=first, latency=latency, itl=itl, ids=ids, tokens=n)


def served_in_process(url, prompts, new_tokens, concurrency):
    """``served`` in a client process of its own (``--client_process``): the clients' work (HTTP, SSE parsing,
    the openai client's models) then competes with the server for the CPU, not for its interpreter lock."""
    return served(make_client(url, REQUEST_TIMEOUT), prompts, new_tokens, concurrency)


def served(client, prompts, new_tokens, concurrency):
    """Run ``prompts`` through ``concurrency`` client threads: (per-request results, wall seconds)."""
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda p: one_request(client, p, new_tokens), prompts, timeout=REQUEST_TIMEOUT * 2))
    return res, time.perf_counter() - start


def start_server(model, max_batch, max_queue, prefix_cache_mb=0):
    """The server in this process; the prefix cache off by default (the load figures repeat the same prompts, which
    the cache would serve from memory: ``--prefix`` measures it)."""
    from mistral_jax.serve.app import Server, create_app
    from mistral_jax.serve.engine import Engine

    engine = Engine(model, IdsTokenizer(), max_batch=max_batch, max_queue=max_queue,
                    prefix_cache_mb=prefix_cache_mb).start()
    server = Server(create_app(engine, MODEL_NAME), "127.0.0.1", 0).start()
    return engine, server


def make_client(url, timeout):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)


# ----------------------------------------------------------------------------- modes
def load(args, model, prompts, levels):
    from mistral_jax.serve.engine import compile_count

    t0 = time.perf_counter()
    head = dict(benchmark="serve_load", preset=args.preset)
    n_of = {c: max(args.requests, c) for c in levels}
    pool = prompts[:max(n_of.values())]
    warm_generate(model, pool, args.new_tokens)
    hf = load_hf(model)
    hf_static(hf, pool[:2], 2, 2)  # warm-up
    compile_count()
    engine, server = start_server(model, args.max_batch, max(n_of.values()))
    warm = compile_count()
    client = make_client(server.url, REQUEST_TIMEOUT)
    rec = collections.defaultdict(lambda: collections.defaultdict(list))  # rec[c][figure] = [per repeat]
    clients = None
    if args.client_process:
        import multiprocessing

        clients = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        clients.submit(served_in_process, server.url, pool[:1], 2, 1).result()  # start it, first round trip
    try:
        one_request(client, pool[0], 2)  # first HTTP round trip
        for _ in range(args.repeats):
            seq_out, t_n, t_1 = sequential(model, pool, args.new_tokens)
            for c in levels:
                n = n_of[c]
                hf_out, hf_s = hf_static(hf, pool[:n], args.new_tokens, c)
                r = rec[c]
                r["seq_tps"].append(n * args.new_tokens / sum(t_n[:n]))
                r["seq_ttft"].append(pct(t_1[:n], 50) * 1e3)
                r["seq_itl"].append((sum(t_n[:n]) - sum(t_1[:n])) / (n * (args.new_tokens - 1)) * 1e3)
                r["hf_tps"].append(n * args.new_tokens / hf_s)
                r["hf_agree"].append(agree(hf_out, seq_out[:n]))
            for c in levels:
                n = n_of[c]
                if clients is not None:
                    res, wall = clients.submit(served_in_process, server.url, pool[:n], args.new_tokens, c).result()
                else:
                    res, wall = served(client, pool[:n], args.new_tokens, c)
                r = rec[c]
                tps = sum(x["tokens"] for x in res) / wall
                r["tps"].append(tps)
                r["ttft_p50"].append(pct([x["ttft"] for x in res], 50) * 1e3)
                r["ttft_p99"].append(pct([x["ttft"] for x in res], 99) * 1e3)
                itl = [g for x in res for g in x["itl"]]
                r["itl_p50"].append(pct(itl, 50) * 1e3)
                r["itl_p99"].append(pct(itl, 99) * 1e3)
                r["vs_seq"].append(tps / r["seq_tps"][-1])
                r["vs_hf"].append(tps / r["hf_tps"][-1])
                r["equal"].append([x["ids"] for x in res] == seq_out[:n])
                if c == 1:
                    r["overhead"].append(statistics.median(
                        (x["latency"] - t) * 1e3 for x, t in zip(res, t_n[:n], strict=True)))
    finally:
        if clients is not None:
            clients.shutdown()
        server.stop()
        engine.stop()
    del hf

    for c in levels:
        r, pt = rec[c], dict(head, concurrency=c, requests=n_of[c])
        lines = [
            dict(pt, figure="tokens_per_s", server=summary(r["tps"], 1),
                 sequential_generate=summary(r["seq_tps"], 1),
                 hf_static_batch=dict(summary(r["hf_tps"], 1), batch=c)),
            dict(pt, figure="ttft_ms", p50=summary(r["ttft_p50"]), p99=summary(r["ttft_p99"]),
                 sequential_generate_p50=summary(r["seq_ttft"])),
            dict(pt, figure="itl_ms", p50=summary(r["itl_p50"]), p99=summary(r["itl_p99"]),
                 sequential_generate_mean=summary(r["seq_itl"], 3)),
        ]
        s = summary(r["vs_seq"])
        if c == GOALS["seq_c"]:
            s.update(goal=f">= {GOALS['seq_ratio']}", met=s["median"] >= GOALS["seq_ratio"])
        lines.append(dict(pt, figure="ratio_vs_sequential_generate", **s))
        s = dict(summary(r["vs_hf"]), hf_batch=c)
        if c == GOALS["hf_c"]:
            s.update(goal=f">= {GOALS['hf_ratio']}", met=s["median"] >= GOALS["hf_ratio"])
        lines.append(dict(pt, figure="ratio_vs_hf_static_batch", **s))
        if c == 1:
            s = summary(r["overhead"])
            lines.append(dict(pt, figure="overhead_ms", **s, goal=f"<= {GOALS['overhead_ms']}",
                              met=s["median"] <= GOALS["overhead_ms"]))
        lines.append(dict(pt, figure="greedy_equal", value=all(r["equal"]), hf_agree=round(min(r["hf_agree"]), 4)))
        for line in lines:
            print(json.dumps(line), flush=True)
    print(json.dumps(dict(
        head, figure="run", backend=__import__("jax").default_backend(), repeats=args.repeats,
        prompt_len=f"{args.prompt_len // 2}-{args.prompt_len - 1}", new_tokens=args.new_tokens,
        max_batch=args.max_batch, cache_slots=getattr(engine, "cache_slots", None),
        prefill_chunk=getattr(engine, "chunk", None), torch_threads=__import__("torch").get_num_threads(),
        compiles_after_warmup=compile_count() - warm,
        engine={k: v for k, v in getattr(engine, "steps", {}).items() if k in ("decode_steps", "prefill_chunks",
                                                                               "peak_rows")},
        runtime_s=round(time.perf_counter() - t0, 1))), flush=True)


def overload(args, model, prompts):
    """Many clients at once against a short queue: status codes, Retry-After, no 5xx, no hang."""
    import openai

    t0 = time.perf_counter()
    timeout = float(args.overload_timeout)
    engine, server = start_server(model, args.max_batch, args.max_queue)
    client = make_client(server.url, timeout)
    n = args.overload_clients
    gate = threading.Barrier(n)

    def hit(i):
        try:
            gate.wait(timeout=timeout)
        except threading.BrokenBarrierError:
            pass
        try:
            res = one_request(client, prompts[i % len(prompts)], args.overload_tokens)
            return ("200", None) if res["tokens"] == args.overload_tokens else ("200_short", None)
        except openai.APIStatusError as e:
            return str(e.status_code), e.response.headers.get("retry-after")
        except openai.APITimeoutError:
            return "timeout", None
        except openai.APIConnectionError:
            return "connection_error", None
        except openai.APIError as e:  # an error event inside a 200 stream
            return "stream_error:" + str(getattr(e, "code", None)), None

    try:
        one_request(client, prompts[0], 2)  # first HTTP round trip
        start = time.perf_counter()
        pool = cf.ThreadPoolExecutor(n)
        futs = [pool.submit(hit, i) for i in range(n)]
        done, pending = cf.wait(futs, timeout=timeout * 2 + 30)
        wall = time.perf_counter() - start
        pool.shutdown(wait=False, cancel_futures=True)
        results = [f.result() for f in done]
        codes = collections.Counter(code for code, _ in results)
        retry = [ra for code, ra in results if code == "429"]
        deadline = time.monotonic() + 30
        busy = lambda st: st.get("active", 0) or st.get("waiting", 0)  # noqa: E731
        while busy(engine.stats()) and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = engine.stats()
        try:
            after = one_request(client, prompts[0], args.overload_tokens)["tokens"] == args.overload_tokens
        except Exception:  # noqa: BLE001 -- reported, not raised
            after = False
    finally:
        server.stop()
        engine.stop()
    server_errors = sum(v for k, v in codes.items() if k[:1] == "5" or k.startswith("stream_error"))
    print(json.dumps(dict(
        benchmark="serve_load", preset=args.preset, figure="overload", clients=n, max_queue=args.max_queue,
        max_batch=args.max_batch, max_tokens=args.overload_tokens, status_counts=dict(sorted(codes.items())),
        hung=len(pending), server_errors=server_errors,
        retry_after=dict(with_header=sum(ra is not None for ra in retry), of_429=len(retry),
                         values=sorted(set(r for r in retry if r is not None))[:5]),
        all_429_have_retry_after=bool(retry) and all(ra is not None for ra in retry),
        drained=not busy(stats), answers_after=after,
        goal="429 once full, no 5xx, no hang, answers afterwards (Retry-After reported, not required)",
        met=len(pending) == 0 and server_errors == 0 and codes.get("429", 0) > 0 and after,
        wall_s=round(wall, 2), runtime_s=round(time.perf_counter() - t0, 1))), flush=True)


def prefix(args, model):
    """TTFT of a request whose long prefix another request just had (prefix cache on) over the first one's: pairs
    of prompts sharing ``--prefix_len`` tokens with different 8-token tails, one after the other."""
    cfg = model.cfg
    n = min(args.prefix_len, cfg.max_seq_len - 32)
    engine, server = start_server(model, args.max_batch, 8, prefix_cache_mb=1024)
    client = make_client(server.url, REQUEST_TIMEOUT)
    rng = np.random.default_rng(1)
    ratios, firsts, seconds = [], [], []
    try:
        for rep in range(args.repeats + 1):  # the first pair warms the client and the engine
            shared = [1] + rng.integers(3, cfg.vocab_size, n - 1).tolist()
            a, b = (shared + rng.integers(3, cfg.vocab_size, 8).tolist() for _ in range(2))
            ta = one_request(client, a, 2)["ttft"]
            tb = one_request(client, b, 2)["ttft"]
            if rep:
                ratios.append(tb / ta)
                firsts.append(ta * 1000)
                seconds.append(tb * 1000)
        print(json.dumps(dict(benchmark="serve_load", preset=args.preset, figure="prefix_ttft_ratio", prefix_len=n,
                              window=cfg.sliding_window, chunk=engine.chunk, ratio=summary(ratios),
                              first_ttft_ms=summary(firsts), second_ttft_ms=summary(seconds), goal="<= 0.3",
                              met=bool(statistics.median(ratios) <= 0.3),
                              hit_tokens=engine.stats()["prefix_hit_tokens"])), flush=True)
    finally:
        server.stop()
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["small", "tiny"])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_batch", type=int, default=16)
    ap.add_argument("--overload", action="store_true", help="the overload check instead of the load figures")
    ap.add_argument("--client_process", action="store_true", help="run the load's clients in a process of their "
                    "own (as real clients are), not in the server's")
    ap.add_argument("--prefix", action="store_true", help="the prefix cache's TTFT figure instead of the load ones")
    ap.add_argument("--prefix_len", type=int, default=2048, help="--prefix: tokens the two prompts share")
    ap.add_argument("--overload_clients", type=int, default=256)
    ap.add_argument("--max_queue", type=int, default=32, help="--overload: the server's waiting places")
    ap.add_argument("--overload_tokens", type=int, default=8)
    ap.add_argument("--overload_timeout", type=int, default=60, help="--overload: seconds per request")
    args = ap.parse_args()
    try:
        levels = [int(x) for x in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency={args.concurrency!r}: comma-separated integers, e.g. 1,4,16,64")
    if not all(1 <= c <= 256 for c in levels) or not 1 <= args.requests <= 256 or not 1 <= args.repeats <= 20:
        ap.error("bounded run: --concurrency values and --requests in [1, 256], --repeats in [1, 20]")
    if not 2 <= args.prompt_len <= 2048 or not 2 <= args.new_tokens <= 1024 or not 1 <= args.overload_clients <= 1024:
        ap.error("bounded run: --prompt_len in [2, 2048], --new_tokens in [2, 1024], --overload_clients in [1, 1024]")
    from mistral_jax.cli import quiet_libraries

    quiet_libraries()
    from flax import nnx

    cfg = mj.ModelConfig(**SMALL) if args.preset == "small" else mj.ModelConfig.tiny(initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    count = args.overload_clients if args.overload else max(args.requests, *levels)
    prompts = [[1] + rng.integers(3, cfg.vocab_size, int(rng.integers(args.prompt_len // 2, args.prompt_len)) - 1
                                  ).tolist() for _ in range(count)]
    if args.prefix:
        prefix(args, model)
    elif args.overload:
        overload(args, model, prompts)
    else:
        load(args, model, prompts, levels)


if __name__ == "__main__":
    main()
