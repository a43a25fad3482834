"""Peak host memory of conversions vs the model size: ``python benchmarks/conversion_memory.py``.

Writes a random HF checkpoint of a mid-size Mistral (default ~440M parameters, float32, 200 MB shards) with
the streaming writer, then runs each conversion in a fresh subprocess and prints one JSON line per case with
the child's peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) next to the checkpoint size. The
``baseline`` case only imports mistral_jax; ``peak_growth_during_conversion_mb`` is the RSS sampled every 5 ms
during the conversion minus the RSS after the imports (the conversion's own cost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

# The worker scripts' prologue (after their imports): a thread samples the process's RSS into ``peak[0]``.
RSS_SAMPLER = """
proc = psutil.Process()
start = proc.memory_info().rss
peak = [start]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
"""

_CASE = """
import json, resource, sys, threading, time
import psutil
import mistral_jax as mj
""" + RSS_SAMPLER + """
t0 = time.time()
case, src, out = sys.argv[1:4]
if case == "hf_to_mistral":
    mj.convert("hf", "mistral", src, out)
elif case == "hf_to_hf_bf16":
    mj.convert("hf", "hf", src, out, dtype="bfloat16", max_shard_size="200MB")
elif case == "mistral_to_hf":
    mj.convert("mistral", "hf", src, out, max_shard_size="200MB")
elif case == "hf_to_jax":
    mj.convert("hf", "jax", src, out)
elif case == "load_pretrained":
    mj.load_pretrained(src)
time.sleep(0.05)
print(json.dumps({"seconds": time.time() - t0, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "before": start, "peak": peak[0]}))
"""


def _write_random_hf(cfg, out_dir: str, shard: str) -> None:
    import numpy as np

    from mistral_jax.convert import hf, paths

    class RandomSource:
        def __init__(self, cfg):
            self.cfg, self.rng = cfg, np.random.default_rng(0)

        def dtype(self, entry):
            return np.dtype(np.float32)

        def read(self, entry):
            return self.rng.standard_normal(entry.model_shape, dtype=np.float32) * 0.02

    with paths.atomic_dir(out_dir) as tmp:
        hf.write(tmp, RandomSource(cfg), max_shard_size=shard)


def model_args(ap: argparse.ArgumentParser) -> None:
    """The random model's size flags and the scratch directory (shared with benchmarks/convert.py)."""
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")


def model_config(args: argparse.Namespace):
    """The ``ModelConfig`` of ``model_args``' flags: heads of 64, a kv head per 256 of dim, window 4096."""
    import mistral_jax as mj

    return mj.ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                          n_kv_heads=max(args.dim // 256, 1), head_dim=64, hidden_dim=args.hidden,
                          num_experts=args.experts, sliding_window=4096)


def random_checkpoint(args: argparse.Namespace, prefix: str) -> tuple[object, str, str, int]:
    """``(cfg, root, src, bytes)``: the scratch directory (``--workdir`` or a new temporary one) and the random HF
    checkpoint of ``model_config(args)`` in ``root/hf`` (written once; 200 MB shards) with its size."""
    cfg = model_config(args)
    root = args.workdir or tempfile.mkdtemp(prefix=prefix)
    src = os.path.join(root, "hf")
    if not os.path.isdir(src):
        _write_random_hf(cfg, src, "200MB")
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    return cfg, root, src, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    model_args(ap)
    ap.add_argument("--cases", default="baseline,hf_to_mistral,mistral_to_hf,hf_to_hf_bf16,hf_to_jax,load_pretrained")
    args = ap.parse_args()

    import mistral_jax as mj

    cfg, root, src, size = random_checkpoint(args, "mj_mem_")
    try:
        print(json.dumps({"params": mj.count_params(cfg), "checkpoint_bytes": size,
                          "shards": len([f for f in os.listdir(src) if f.endswith(".safetensors")])}), flush=True)
        for case in args.cases.split(","):
            inp = os.path.join(root, "mistral") if case == "mistral_to_hf" else src
            out = os.path.join(root, f"out_{case}")
            r = subprocess.run([sys.executable, "-c", _CASE, case, inp, out], check=True, capture_output=True,
                               text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            res = json.loads(r.stdout.strip().splitlines()[-1])  # the child's own peak RSS (KiB on Linux)
            print(json.dumps({"case": case, "peak_rss_mb": round(res["rss_kb"] / 1024, 1),
                              "rss_after_import_mb": round(res["before"] / 2**20, 1),
                              "peak_growth_during_conversion_mb": round((res["peak"] - res["before"]) / 2**20, 1),
                              "checkpoint_mb": round(size / 2**20, 1), "seconds": round(res["seconds"], 1)}),
                  flush=True)
            if case == "hf_to_mistral":
                shutil.move(out, os.path.join(root, "mistral"))
            elif os.path.isdir(out):
                shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
