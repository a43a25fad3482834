"""`make demo`'s script end to end (shortened): train on the bundled corpus, evaluate through lm-eval, export to HF.

Runs ``scripts/demo.sh`` as the README's main command does (its 300 steps), into a temporary directory, and
checks what a user gets: a trained run, lm-eval results, an HF export that transformers loads and whose logits
equal the JAX model's, and the figures it prints: each is the run's value to the precision printed, and the figures
the docs quote from "one run" are this run's, to the precision quoted.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the docs quote from a demo run (README.md or docs/): the losses, held-out loss and bits per byte, and
# train.py's summary line.
QUOTED_RUN = re.compile(r"train loss went from (\d+\.\d+) \(step (\d+)\) to (\d+\.\d+) \(step (\d+)\), the "
                        r"held-out loss was (\d+\.\d+) and the\s+bits per byte (\d+\.\d+)")
QUOTED_SUMMARY = re.compile(r"train: done at step (\d+)/(\d+); final loss (\d+\.\d+); newest checkpoint runs/demo/")


def _docs_text() -> str:
    paths = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    return re.sub(r"\s+", " ", "\n".join(open(p, encoding="utf-8").read() for p in paths))  # quotes wrap lines


def _same(value: float, quoted: str) -> bool:
    """``value`` printed to the number of decimals of ``quoted`` is ``quoted``."""
    return f"{value:.{len(quoted.split('.')[1])}f}" == quoted


@pytest.mark.slow
def test_demo_script_trains_evaluates_and_exports(tmp_path):
    workdir, export = tmp_path / "demo", tmp_path / "demo-hf"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(PYTHON=sys.executable, WORKDIR=str(workdir), EXPORT=str(export), JAX_PLATFORMS="cpu")
    steps = 300  # configs/tiny.py's, as `make demo` runs it
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh"), "--config.progress_bar=False"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"demo done: run in {workdir}, HF export in {export}" in proc.stdout

    # 1. trained: the loss fell, a held-out loss was measured, a checkpoint and the tokenizer are in the workdir
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert train[-1]["step"] == steps and train[-1]["loss"] < train[0]["loss"] - 0.5, (train[0], train[-1])
    assert any("eval/loss" in r for r in rows)
    assert os.path.isdir(workdir / "checkpoints" / str(steps)) and os.path.isfile(workdir / "tokenizer.model")

    # 2. evaluated: lm-eval's results file with the perplexity metrics
    (results,) = glob.glob(str(workdir / "eval" / "**" / "results_*.json"), recursive=True)
    metrics = json.load(open(results))["results"]["pydoc_ppl"]
    assert 1.0 < metrics["bits_per_byte,none"] < 8.0 and metrics["byte_perplexity,none"] > 1.0

    # 3. exported: transformers loads the HF files and gives the JAX model's logits
    import torch
    import transformers

    import mistral_jax as mj

    hf = transformers.AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    ours = mj.load_pretrained(str(workdir))
    tokens = np.random.default_rng(0).integers(0, ours.cfg.vocab_size, (1, 24)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens)), ref, atol=1e-4, rtol=0)
    assert os.path.isfile(export / "tokenizer.model")

    # 4. the printed figures: the script's summary and train.py's last line are the run's values to their printed
    # precision, lm-eval's table shows the results file's bits per byte (4 decimals)
    held_out = [r for r in rows if "eval/loss" in r][-1]["eval/loss"]
    bpb = metrics["bits_per_byte,none"]
    assert (f"train loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} (step {steps}); "
            f"held-out loss {held_out:.3f}") in proc.stdout
    assert f"train: done at step {steps}/{steps}; final loss {train[-1]['loss']:.4f}; " in proc.stdout + proc.stderr
    assert re.search(rf"\|bits_per_byte\s*\|[^|]*\|\s*{bpb:.4f}\|", proc.stdout), proc.stdout[-2000:]
    # 5. the docs quote this run: the same steps and figures, to the decimals they give
    docs = _docs_text()
    quotes = list(QUOTED_RUN.finditer(docs))
    assert quotes, "the docs no longer quote a demo run (\"train loss went from ...\"). Fix: update QUOTED_RUN."
    for quoted in quotes:  # every place that quotes it (README and docs/)
        first, first_step, last, last_step, ev, bits = quoted.groups()
        assert (int(first_step), int(last_step)) == (train[0]["step"], steps), quoted.group(0)
        assert [_same(v, q) for v, q in ((train[0]["loss"], first), (train[-1]["loss"], last), (held_out, ev),
                                         (bpb, bits))] == [True] * 4, (quoted.group(0), train[0], train[-1], held_out,
                                                                       bpb)
    summaries = list(QUOTED_SUMMARY.finditer(docs))
    assert summaries, "the docs no longer quote train.py's summary line. Fix: update QUOTED_SUMMARY."
    for summary in summaries:
        assert summary.group(1) == summary.group(2) == str(steps) and _same(train[-1]["loss"], summary.group(3)), (
            summary.group(0), train[-1])
