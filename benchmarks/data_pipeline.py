"""Prepared-data pipeline figures: ``python benchmarks/data_pipeline.py [--mb 128] [--repeats 3]``.

A jsonl corpus of ``--mb`` MB is made from the bundled one (its documents repeated, each copy numbered) for the
prepare figures (big enough that a run's fixed costs are amortised as on a real corpus), and corpora of
``--rss_mb`` and ten times that for the loader figures. One JSON line per figure (median and range over
``--repeats``), ratios taken against a peer measured in the same run:

* ``prepare_overhead``: seconds of ``data.prepare`` on one worker / seconds of plain ``SentencePieceProcessor.
  encode`` of the same documents (reading, packing and writing shards included); target <= 1.10;
* ``prepare_speedup_2_workers``: one worker's seconds / two workers' (target >= 1.8 where two cores are free);
* ``loader_tokens_per_s``: tokens per second one process reads from the prepared shards with one Grain thread
  (batches of ``--batch`` rows of ``--seq_len``, shuffled), and its ratio to 23k tok/s, what a v5p host of 4 chips
  consumes training Mistral 7B at MaxText's published MFU (target >= 1M tok/s, >= 40x);
* ``loader_rss_10x_over_1x``: peak RSS of a process reading 200 batches of the 10x corpus / of the 1x corpus
  (target <= 1.10: memory does not grow with the corpus);
* ``resume_10000_over_10``: seconds from ``set_state`` to the first batch at step 10,000 / at step 10 (target
  <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CORPUS = os.path.join(ROOT, "mistral_jax", "data", "corpus", "pydoc_train.jsonl")
V5P_HOST_TOKENS_PER_S = 23_000  # Mistral 7B on a 4-chip v5p host at MaxText's published MFU


def _line(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def make_corpus(path: str, mb: int) -> int:
    """A jsonl file of about ``mb`` MB: the bundled documents repeated, each copy numbered. Returns documents."""
    docs = [json.loads(line)["text"] for line in open(CORPUS) if line.strip()]
    n, size = 0, 0
    with open(path, "w") as f:
        while size < mb << 20:
            for d in docs:
                line = json.dumps({"text": f"[{n}] {d}"}) + "\n"
                f.write(line)
                size += len(line)
                n += 1
    return n


def _encode_seconds(path: str, tokenizer: str) -> float:
    import sentencepiece as spm

    from mistral_jax.data.tokenizer import resolve

    sp = spm.SentencePieceProcessor()
    sp.Load(resolve(tokenizer))
    t = time.perf_counter()
    with open(path) as f:
        for line in f:
            sp.encode(json.loads(line)["text"])
    return time.perf_counter() - t


def _prepare_seconds(path: str, dest: str, tokenizer: str, seq_len: int, workers: int, shard_mb: int) -> float:
    import shutil

    from mistral_jax.data.prepare import prepare

    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    prepare(path, dest, tokenizer=tokenizer, seq_len=seq_len, workers=workers, shard_bytes=shard_mb << 20,
            progress=False)
    return time.perf_counter() - t


_READER = """
import json, resource, sys, time
from mistral_jax.data import loader, prepared
path, batch, steps, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
src = prepared.open_dataset(path)
it = loader.GrainBatches([("d", src, 1.0)], batch, range(batch), seed=0, num_threads=1, prefetch=2)
if resume:
    t = time.perf_counter()
    it.set_state({"kind": "prepared", "grain": {"next_index": resume}, "mixture": {"d": 1.0}})
    next(it)
    print(json.dumps({"resume_s": time.perf_counter() - t}))
    sys.exit()
next(it)
t, tokens = time.perf_counter(), 0
for _ in range(steps):
    tokens += int((next(it)["segment_ids"] > 0).sum())
dt = time.perf_counter() - t
print(json.dumps({"tokens_per_s": tokens / dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _reader(path: str, batch: int, steps: int, resume: int = 0) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _READER, path, str(batch), str(steps), str(resume)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT,
                                                                           "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=128, help="size of the prepare figures' corpus in MB")
    p.add_argument("--rss_mb", type=int, default=16, help="size of the loader figures' 1x corpus in MB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokenizer", default="mistral:v1")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tmp", default=None)
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="data_pipeline_", dir=args.tmp)
    corpus = os.path.join(tmp, "corpus.jsonl")
    small, large = os.path.join(tmp, "corpus_1x.jsonl"), os.path.join(tmp, "corpus_10x.jsonl")
    docs = make_corpus(corpus, args.mb)
    make_corpus(small, args.rss_mb)
    make_corpus(large, args.rss_mb * 10)
    _line(figure="corpus", mb=args.mb, documents=docs, loader_mb=[args.rss_mb, args.rss_mb * 10], path=tmp)

    shard_mb = max(1, args.mb // 8)  # 8+ units: two workers have work to share
    enc, one, two = [], [], []
    scratch = os.path.join(tmp, "prepared")
    for _ in range(args.repeats):
        enc.append(_encode_seconds(corpus, args.tokenizer))
        one.append(_prepare_seconds(corpus, scratch, args.tokenizer, args.seq_len, 1, shard_mb))
        two.append(_prepare_seconds(corpus, scratch, args.tokenizer, args.seq_len, 2, shard_mb))
    overhead = [o / e for o, e in zip(one, enc, strict=True)]
    speedup = [o / t for o, t in zip(one, two, strict=True)]
    _line(figure="sentencepiece_encode_s", **_stats(enc))
    _line(figure="prepare_1_worker_s", **_stats(one))
    _line(figure="prepare_2_workers_s", **_stats(two))
    _line(figure="prepare_overhead", target="<= 1.10", cpus=os.cpu_count(), **_stats(overhead))
    _line(figure="prepare_speedup_2_workers", target=">= 1.8", cpus=os.cpu_count(), **_stats(speedup))

    dest, big = os.path.join(tmp, "prepared_1x"), os.path.join(tmp, "prepared_10x")
    _prepare_seconds(small, dest, args.tokenizer, args.seq_len, os.cpu_count() or 1, shard_mb)
    _prepare_seconds(large, big, args.tokenizer, args.seq_len, os.cpu_count() or 1, shard_mb)
    rates, rss1, rss10 = [], [], []
    for _ in range(args.repeats):
        r1 = _reader(dest, args.batch, 200)
        r10 = _reader(big, args.batch, 200)
        rates.append(r1["tokens_per_s"])
        rss1.append(r1["rss_mb"])
        rss10.append(r10["rss_mb"])
    _line(figure="loader_tokens_per_s", target=">= 1e6", **_stats(rates))
    _line(figure="loader_over_v5p_host_need", target=">= 40", **_stats([r / V5P_HOST_TOKENS_PER_S for r in rates]))
    _line(figure="loader_rss_mb_1x", **_stats(rss1))
    _line(figure="loader_rss_mb_10x", **_stats(rss10))
    _line(figure="loader_rss_10x_over_1x", target="<= 1.10", **_stats([b / a for a, b in zip(rss1, rss10,
                                                                                           strict=True)]))
    at10, at10k = [], []
    for _ in range(args.repeats):
        at10.append(_reader(big, args.batch, 0, resume=10)["resume_s"])
        at10k.append(_reader(big, args.batch, 0, resume=10_000)["resume_s"])
    _line(figure="resume_s_step_10", **_stats(at10))
    _line(figure="resume_s_step_10000", **_stats(at10k))
    _line(figure="resume_10000_over_10", target="<= 2", **_stats([b / a for a, b in zip(at10, at10k, strict=True)]))


if __name__ == "__main__":
    main()
