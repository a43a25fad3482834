"""Export speed and memory against a plain file copy: ``python benchmarks/convert.py``.

Writes a random HF checkpoint of a mid-size Mistral (default ~440M parameters, float32, 200 MB shards, mistral:v1's
tokenizer beside it), then, ``--repeats`` times each, in a fresh subprocess per run (imports not timed):

* ``copy``: ``shutil.copyfile`` of the checkpoint's ``.safetensors`` shards to the same disk (the peer);
* ``hf_to_hf``: ``mistral-jax-convert --from hf --to hf`` (float32, the same bytes out);
* ``hf_to_gguf`` / ``hf_to_gguf_q8_0``: ``--to gguf`` in float32 / q8_0.

One JSON line per case: MB/s (checkpoint bytes read per second; the input is the same for every case), its ratio to
the copy's MB/s in the same run (goal >= 0.5), output bytes, and the peak RSS growth during the export (sampled
every 5 ms) against the goal "the largest tensor + 1 GB". Medians and ranges over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conversion_memory import RSS_SAMPLER, model_args, random_checkpoint  # noqa: E402  (shared with it)

_CASE = """
import json, os, shutil, sys, threading, time
import psutil
case, src, out = sys.argv[1:4]
if case != "copy":
    from mistral_jax.cli import convert
if case.startswith("hf_to_gguf"):
    import gguf  # noqa: F401  (the writer's import, 0.4 s: it imports mistral_common; imports are not timed)
""" + RSS_SAMPLER + """
t0 = time.perf_counter()
if case == "copy":
    os.makedirs(out)
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, f), os.path.join(out, f))
else:
    to, dtype = {"hf_to_hf": ("hf", None), "hf_to_gguf": ("gguf", None), "hf_to_gguf_q8_0": ("gguf", "q8_0")}[case]
    argv = ["--from", "hf", "--to", to, "--input", src, "--output", out] + (["--dtype", dtype] if dtype else [])
    rc = convert.main(argv)
    assert not rc, rc
seconds = time.perf_counter() - t0
time.sleep(0.02)
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
print(json.dumps({"seconds": seconds, "out_bytes": size, "before": start, "peak": peak[0]}))
"""


def _median_range(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "range": [round(min(xs), 3), round(max(xs), 3)], "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    model_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="copy,hf_to_hf,hf_to_gguf,hf_to_gguf_q8_0")
    args = ap.parse_args()

    import mistral_jax as mj
    from mistral_jax.data import tokenizer as tokenizer_lib

    cfg, root, src, size = random_checkpoint(args, "mj_convert_")
    try:
        shutil.copyfile(tokenizer_lib.resolve("mistral:v1"), os.path.join(src, "tokenizer.model"))
        largest = max(args.vocab * args.dim, args.hidden * args.dim) * 4  # the embedding or an MLP matrix, float32
        print(json.dumps({"params": mj.count_params(cfg), "checkpoint_mb": round(size / 2**20, 1),
                          "largest_tensor_mb": round(largest / 2**20, 1)}), flush=True)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # cases interleaved: a slow spell of the machine hits each one alike
            for case in args.cases.split(","):
                out = os.path.join(root, f"out_{case}")
                shutil.rmtree(out, ignore_errors=True)
                r = subprocess.run([sys.executable, "-c", _CASE, case, src, out], check=True, capture_output=True,
                                   text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
                runs.setdefault(case, []).append(json.loads(r.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
        copy = [size / 2**20 / r["seconds"] for r in runs.get("copy", [])]
        for case, rs in runs.items():
            mbs = [size / 2**20 / r["seconds"] for r in rs]
            growth = [(r["peak"] - r["before"]) / 2**20 for r in rs]
            line = {"case": case, "mb_per_s": _median_range(mbs), "seconds": _median_range([r["seconds"] for r in rs]),
                    "out_mb": round(rs[-1]["out_bytes"] / 2**20, 1), "peak_rss_growth_mb": _median_range(growth),
                    "rss_goal_mb": round(largest / 2**20 + 1024, 1),
                    "rss_goal_met": max(growth) <= largest / 2**20 + 1024}
            if copy and case != "copy":
                ratios = [m / c for m, c in zip(mbs, copy, strict=False)]  # run i against the copy of round i
                line.update(vs_copy=_median_range(ratios), goal=">= 0.5", met=statistics.median(ratios) >= 0.5)
            print(json.dumps(line), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
