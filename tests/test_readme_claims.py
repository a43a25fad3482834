"""README claims that had no test: expert load in metrics.jsonl, the standalone tokenizer-training command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from mistral_jax.data.corpus import TRAIN
from mistral_jax.training import trainer
from mistral_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TRAIN_TOKENIZER = os.path.join(os.path.dirname(sys.executable), "mistral-jax-train-tokenizer")  # the console script


@pytest.mark.heavy
def test_train_tokenizer_command(tmp_path):
    """``mistral-jax-train-tokenizer``: a sentencepiece model with Mistral's special ids."""
    # Trains its own tokenizer: the console script that trains it is what this test is about.
    out = tmp_path / "tok.model"
    proc = subprocess.run([TRAIN_TOKENIZER, "--input", TRAIN, "--output", str(out), "--vocab_size", "600"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert sp.get_piece_size() == 600
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    text = "def f(x): return x # ünïcödé ✓"
    assert sp.decode(sp.encode(text)) == text  # byte fallback: nothing is lost
    # too small a vocabulary for the data: one line naming the minimum, exit 2
    proc = subprocess.run([TRAIN_TOKENIZER, "--input", TRAIN,
                           "--output", str(tmp_path / "small.model"), "--vocab_size", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Fix: pass --vocab_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "small.model")


@pytest.mark.slow
def test_expert_load_is_logged_per_expert(tmp_path, tokenizer_path):
    """A Mixtral run writes ``expert_load/e{i}`` to metrics.jsonl: each expert's share of the top-k assignments."""
    cfg = trainer.load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    cfg.progress_bar = False
    cfg.update_from_flattened_dict({"model.preset": "tiny_mixtral", "num_steps": 3, "batch_size": 8, "log_every": 1,
                                    "data.seq_len": 32, "data.validation": "", "optimizer.warmup_steps": 1,
                                    "checkpoint.every_steps": 3, "data.tokenizer": tokenizer_path})
    trainer.train(cfg, str(tmp_path / "run"))
    rows = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    with open(tmp_path / "run" / "model_config.json") as f:
        experts = json.load(f)["num_experts"]
    for r in rows:
        load = np.array([r[f"expert_load/e{e}"] for e in range(experts)])
        assert f"expert_load/e{experts}" not in r
        np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-5)  # fractions of all assignments (mean over layers)
        assert (load >= 0).all() and load.max() < 1.0  # a random router spreads tokens over several experts
