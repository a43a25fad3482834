"""`make demo`'s script end to end (shortened): train on the bundled corpus, evaluate through lm-eval, export to HF.

Runs ``scripts/demo.sh`` as the README's main command does, with fewer steps, into a temporary directory, and
checks what a user gets: a trained run, lm-eval results, and an HF export that transformers loads and whose logits
equal the JAX model's.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_script_trains_evaluates_and_exports(tmp_path):
    workdir, export = tmp_path / "demo", tmp_path / "demo-hf"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(PYTHON=sys.executable, WORKDIR=str(workdir), EXPORT=str(export), JAX_PLATFORMS="cpu")
    steps = 40
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh"), f"--config.num_steps={steps}",
                           "--config.eval_every=40", "--config.progress_bar=False"],
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
