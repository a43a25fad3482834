"""The GPU check (issue 37: ``scripts/gpu_check.sh`` running ``benchmarks/gpu_check.py``'s pieces).

Without a GPU: one stderr line with the fix and exit 2, before anything but jax loads; a bad argument likewise.
``--dry`` runs every piece on the CPU with tiny shapes, and each figure is checked against its pass mark here, so
the pieces keep working where no GPU is (on a GPU node: ``bash scripts/gpu_check.sh``, docs/pod.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHECK = ROOT / "benchmarks" / "gpu_check.py"


def _env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: this venv's python, no fake devices from conftest.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "GPU_CHECK_TIMEOUT")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _run(*args: str, timeout: float = 300, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ no GPU, bad use
def test_no_gpu_is_one_line_with_the_fix_and_exit_2():
    """JAX_PLATFORMS=cpu hides any GPU, so this is the no-GPU path on every machine."""
    proc, seconds = _run(JAX_PLATFORMS="cpu", timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check: no CUDA GPU visible to JAX") and "Fix: " in lines[0], lines[0]
    assert "unset JAX_PLATFORMS" in lines[0] and "--dry" in lines[0], lines[0]
    assert proc.stdout == ""
    assert seconds < 30, f"the no-GPU answer took {seconds:.1f} s: something slow loads before the probe"


def test_probe_imports_only_jax():
    """Before the probe answers, nothing slow is imported: no flax, no mistral_jax, no torch."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(CHECK)!r}, '--probe']\n"
            "try:\n"
            f"    runpy.run_path({str(CHECK)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    code = e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'mistral_jax', 'torch', "
            "'transformers', 'optax', 'orbax'))\n"
            "print(code, heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.splitlines()[-1]
    assert last == "2 []", proc.stdout


def test_python_without_jax_is_one_line_with_the_fix():
    proc, _ = _run(PYTHON="/nonexistent/python3", timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Fix: activate the project's virtualenv" in lines[0], proc.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["--pieces", "parity,nope"], ["--pieces"], ["--pieces="],
                                  ["--out"], ["--out", "--dry"], ["--dry", "extra"]])
def test_bad_argument_is_one_line_with_the_fix_and_exit_2(args):
    proc, seconds = _run(*args, timeout=60)
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Fix: " in lines[0] and lines[0].startswith("gpu_check: "), (args, proc.stderr)
    assert proc.stdout == "" and seconds < 10, (args, seconds)


def test_bad_timeout_is_one_line_with_the_fix_and_exit_2():
    proc, _ = _run("--dry", GPU_CHECK_TIMEOUT="soon", timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "GPU_CHECK_TIMEOUT" in lines[0] and "Fix: " in lines[0], proc.stderr


def test_help_names_every_option_and_exit_status():
    proc, _ = _run("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for word in ("--dry", "--out FILE", "--pieces", "GPU_CHECK_TIMEOUT", "Exit status: 0"):
        assert word in proc.stdout, (word, proc.stdout)


# ------------------------------------------------------------------------------------------------ failures count
def test_a_piece_that_dies_fails_the_check():
    """A piece past its time limit: a line saying so, its figures missing, summary not ok, exit 1."""
    proc, _ = _run("--dry", "--pieces", "train", GPU_CHECK_TIMEOUT="1", timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert lines[0]["figure"] == "train" and lines[0]["ok"] is False and "timed out after 1 s" in lines[0]["error"]
    summary = lines[-1]
    assert summary["figure"] == "summary" and summary["ok"] is False
    assert summary["failed"] == ["train"] and summary["missing"] == ["train_step"], summary


def _summarize(tmp_path, lines: list[dict], expect: str) -> tuple[int, dict]:
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run([sys.executable, str(CHECK), "--summarize", str(path), "--expect", expect],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout.splitlines()
    assert len(out) == 1, proc.stdout
    return proc.returncode, json.loads(out[0])


def test_summary_fails_on_a_failed_unmarked_or_missing_figure(tmp_path):
    good = [{"figure": "moe_parity", "ok": True, "device": "cpu", "dry": True}, {"figure": "moe_time", "ok": True}]
    rc, summary = _summarize(tmp_path, good, "moe")
    assert rc == 0 and summary["ok"] is True and summary["figures"] == 2 and summary["missing"] == []
    rc, summary = _summarize(tmp_path, [good[0], {**good[1], "ok": False, "error": "slow"}], "moe")
    assert rc == 1 and summary["ok"] is False and summary["failed"] == ["moe_time"]
    rc, summary = _summarize(tmp_path, [good[0], {"figure": "moe_time"}], "moe")  # no pass field: not a pass
    assert rc == 1 and summary["failed"] == ["moe_time"]
    rc, summary = _summarize(tmp_path, good, "moe,train")
    assert rc == 1 and summary["missing"] == ["train_step"]
    rc, summary = _summarize(tmp_path, [], "")
    assert rc == 1 and summary["ok"] is False


# ------------------------------------------------------------------------------------------------ --dry
def _dry(pieces: str, tmp_path) -> list[dict]:
    """``gpu_check.sh --dry --pieces PIECES --out FILE``: exit 0, every stdout line a JSON object with ``figure`` and
    ``ok`` true, the summary last; the lines also in FILE. Returns the figures' lines (summary excluded)."""
    out = tmp_path / "gpu_check.jsonl"
    proc, seconds = _run("--dry", "--pieces", pieces, "--out", str(out), timeout=600)
    log = out.with_name(out.name + ".log")
    detail = f"{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}\n{log.read_text()[-3000:] if log.exists() else ''}"
    assert proc.returncode == 0, detail
    lines = [json.loads(x) for x in proc.stdout.splitlines()]  # every line is JSON
    assert lines and all(isinstance(x, dict) and "figure" in x for x in lines), detail
    assert all(x["ok"] is True for x in lines), [x for x in lines if x.get("ok") is not True]
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    summary = lines[-1]
    assert summary["figure"] == "summary" and summary["pieces"] == pieces.split(",") and summary["dry"] is True
    assert summary["failed"] == [] and summary["missing"] == [] and summary["figures"] == len(lines) - 1
    assert all(x["dry"] is True for x in lines[:-1])
    print(f"gpu_check --dry --pieces {pieces}: {seconds:.1f} s")
    return lines[:-1]


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_dry_parity_attention_moe_train(tmp_path):
    lines = _dry("parity,attention,moe,train", tmp_path)
    by = {}
    for x in lines:
        by.setdefault(x["figure"], []).append(x)
    assert set(by) == {"parity", "attention_parity", "attention_time", "moe_parity", "moe_time", "train_step"}, by

    # logits parity: both models, both dtypes, within the tolerance of their dtype
    parity = {(x["model"], x["dtype"]): x for x in by["parity"]}
    assert set(parity) == {(m, d) for m in ("mistral", "mixtral") for d in ("float32", "bfloat16")}, parity
    for (_model, dtype), x in parity.items():
        assert x["tol"] == (1e-4 if dtype == "float32" else 3e-2), x
        assert _finite(x["rel_err"]) and 0 <= x["rel_err"] <= x["tol"], x
        assert x["argmax_agree"] >= (1.0 if dtype == "float32" else 0.9), x
        assert x["reference"].startswith("cpu float32, reference attention"), x
    assert parity["mistral", "float32"]["attention"] == "blocked"  # the CPU's pick, checked against the reference
    assert parity["mixtral", "float32"]["moe"].startswith("ragged") and "dense MoE" in parity["mixtral", "float32"][
        "reference"]

    # the kernels: bfloat16 within their bound of the float32 oracle, the XLA peer's own error reported
    for fig, own in (("attention_parity", "reference"), ("moe_parity", "dense")):
        (x,) = by[fig]
        for kind in ("out", "grad"):
            err, bound, peer = x[f"{kind}_rel_err"], x[f"{kind}_bound"], x[f"{own}_{kind}_rel_err"]
            assert _finite(err) and _finite(peer) and 0 < err <= bound and bound >= 3e-2, (fig, kind, x)
            assert math.isclose(bound, max(3e-2, 2 * peer), rel_tol=1e-5), x
    assert by["attention_parity"][0]["backend"].startswith("blocked")
    assert by["moe_parity"][0]["backend"].startswith("ragged")
    for fig in ("attention_time", "moe_time"):
        (x,) = by[fig]
        times = [t for pair in x["times"].values() for t in pair.values()]
        assert len(times) >= 4 and all(_finite(t) and t > 0 for t in times), x
        assert _finite(x["speedup_fwd"]) and _finite(x["speedup_fwd_bwd"]), x

    # the train step: tokens/s, MFU against the stated (measured, not datasheet) CPU peak
    (x,) = by["train_step"]
    assert _finite(x["tokens_per_s"]) and x["tokens_per_s"] > 0, x
    assert _finite(x["peak_flops"]) and x["peak_flops"] > 0 and "measured CPU float32 matmul" in x["peak_source"], x
    assert x["dtype"] == "float32" and _finite(x["mfu"]) and 0 < x["mfu"] <= 1, x
    assert math.isclose(x["mfu"], x["tokens_per_s"] * x["flops_per_token"] / x["peak_flops"], rel_tol=1e-4), x
    assert _finite(x["loss"]) and abs(x["loss"] - x["loss_uniform"]) < 1.0, x  # a random model near ln(vocab)


@pytest.mark.slow
@pytest.mark.oracle
def test_dry_decode_against_hf_generate(tmp_path):
    (x,) = _dry("decode", tmp_path)
    assert x["figure"] == "decode" and x["batch"] == 1 and x["dtype"] == "float32" and x["torch_device"] == "cpu", x
    for side in ("ours", "hf"):
        for phase in ("prefill", "decode"):
            assert _finite(x[f"{side}_{phase}_tok_s"]) and x[f"{side}_{phase}_tok_s"] > 0, x
    assert x["greedy_tokens_agree"] == 1.0 and x["agree_needed"] == 1.0, x
    assert _finite(x["decode_ratio"]) and _finite(x["prefill_ratio"]), x
