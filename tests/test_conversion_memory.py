"""The README's conversion memory claim: converting streams one tensor at a time, so the converter's peak memory
grows by about the largest tensor, not by the checkpoint (measured by benchmarks/conversion_memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_conversion_peak_memory_is_one_tensor_not_the_checkpoint(tmp_path):
    dim, vocab = 512, 32000
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "conversion_memory.py"), "--dim", str(dim),
                           "--layers", "12", "--hidden", "2048", "--vocab", str(vocab),
                           "--cases", "hf_to_mistral,mistral_to_hf", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checkpoint_mb = rows[0]["checkpoint_bytes"] / 2**20  # ~300 MB of float32
    largest_mb = vocab * dim * 4 / 2**20  # the embedding (and LM head): 62.5 MB
    cases = {r["case"]: r for r in rows[1:]}
    assert set(cases) == {"hf_to_mistral", "mistral_to_hf"}
    for case, r in cases.items():
        growth = r["peak_growth_during_conversion_mb"]
        assert growth < 2 * largest_mb and growth < 0.5 * checkpoint_mb, (case, growth, largest_mb, checkpoint_mb)
