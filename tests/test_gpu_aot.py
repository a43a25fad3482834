"""Deviceless AOT for GPU nodes (``python -m mistral_jax.aot --topology h100-8``): compile-only CUDA devices from
``aot.gpu``'s device description, with JAX's CUDA plugin and no GPU.

The CUDA plugin is a 5 GB install of the current JAX (Python >= 3.12), so these tests run it in a Python of its
own, named by ``MISTRAL_JAX_CUDA_PYTHON`` (``.ci/run`` builds and caches one in stage 2); without it they are
skipped with that reason. The topology parsing needs no plugin.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_jax import aot
from mistral_jax.aot import gpu

ROOT = Path(__file__).resolve().parent.parent
CUDA_PYTHON = os.environ.get("MISTRAL_JAX_CUDA_PYTHON", "")
needs_cuda = pytest.mark.skipif(
    not CUDA_PYTHON, reason="MISTRAL_JAX_CUDA_PYTHON is not set: no Python with JAX's CUDA plugin (jax[cuda12]) to "
    "compile for GPUs. .ci/run builds one in stage 2; by hand: a Python >= 3.12 venv, pip install "
    "'jax[cuda12]==<jax>' -e ., then MISTRAL_JAX_CUDA_PYTHON=<venv>/bin/python")
GiB = 1024**3


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", PYTHONPATH=str(ROOT))
    return env


def _aot(config: str, topology: str, *overrides: str) -> dict:
    cmd = [CUDA_PYTHON, "-m", "mistral_jax.aot", "--config", config, "--topology", topology, *overrides, "--json"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(lines[-1])


def test_gpu_topologies_parse_and_describe_the_gpu():
    t = aot.parse_topology("h100-8")
    assert (t.platform, t.generation, t.grid, t.chips, t.libtpu_name) == ("gpu", "h100", "1x1x8", 8, "cuda:1x1x8")
    assert t.hbm_bytes == gpu.GPUS["h100"].memory_bytes and 79 * GiB < t.hbm_bytes < 80 * GiB
    two = aot.parse_topology("2xh100-8")
    assert (two.grid, two.chips) == ("1x2x8", 16)
    assert aot.parse_topology("h200-8").hbm_bytes > 140 * GiB
    config = gpu.target_config(gpu.GPUS["h100"])
    assert "core_count: 132" in config and "major: 9" in config and 'platform_name: "CUDA"' in config
    with pytest.raises(ValueError, match=r"unknown TPU topology 'a100x-8'.*GPU nodes: h100-8"):
        aot.parse_topology("a100x-8")


@pytest.mark.skipif(gpu.cuda_plugin_available(), reason="this Python has the CUDA plugin")
def test_a_gpu_topology_without_the_cuda_plugin_is_one_line():
    import jax

    out = subprocess.run([sys.executable, "-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--topology",
                          "h100-8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "aot: --topology='h100-8' needs JAX's CUDA plugin to compile for GPUs, and it is not installed. Fix: pip "
        f"install 'jax[cuda12]=={jax.__version__}' (no GPU or driver needed)"]


@needs_cuda
def test_a_gpu_topology_with_num_slices_is_one_line():
    out = subprocess.run([CUDA_PYTHON, "-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--topology",
                          "h100-8", "--num_slices", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "aot: --num_slices=2 counts TPU slices, not nodes of h100-8. Fix: name the nodes in the topology: "
        "--topology 2xh100-8"]


@needs_cuda
@pytest.mark.heavy
def test_mistral_7b_and_mixtral_train_steps_fit_an_h100_node():
    """Mistral 7B with FSDP over the 8 GPUs and Mixtral 8x7B with fsdp x expert (bfloat16 weights and Adam state:
    float32 ones alone are 65 GiB per GPU) compile for h100-8 and fit 80 GiB per GPU with full remat."""
    m7 = _aot("configs/mistral_7b.py", "h100-8", "--config.batch_size=8", "--config.grad_accum_steps=1")
    assert m7["platform"] == "gpu" and m7["mesh"]["fsdp"] == 8 and m7["remat"] == "full"
    assert m7["fits"] and 10 * GiB < m7["total"] <= 80 * GiB, m7["total"] / GiB
    assert m7["model_flops_per_chip"] > 0 and m7["collectives"]["all-gather"]["bytes"] > 0
    mx = _aot("configs/mixtral_8x7b.py", "h100-8", "--config.batch_size=8", "--config.grad_accum_steps=1",
              "--config.mesh.fsdp=2", "--config.mesh.expert=4", "--config.model.param_dtype=bfloat16")
    assert (mx["mesh"]["fsdp"], mx["mesh"]["expert"]) == (2, 4) and mx["moe_impl"] == "ragged"
    assert mx["fits"] and 30 * GiB < mx["total"] <= 80 * GiB, mx["total"] / GiB
    assert mx["collectives"]["ragged-all-to-all"]["count"] > 0  # the expert-parallel dispatch on GPUs


@needs_cuda
@pytest.mark.heavy
def test_cudnn_sliding_window_and_ragged_experts_compile_for_an_h100():
    out = subprocess.run([CUDA_PYTHON, str(ROOT / "tests" / "gpu_aot_worker.py")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads(lines[-1])
    assert r["platform"] == "gpu" and r["device"] == gpu.GPUS["h100"].name
    assert r["cudnn_fmha_calls"] >= 2 and r["cudnn_windows"] == [4096]  # forward and backward, windowed
    assert r["expert_mlp"] == "ragged_dot" and r["moe_ragged_dots"] >= 6 and r["moe_dots_over_all_experts"] == 0


@needs_cuda
@pytest.mark.heavy
def test_fp8_training_compiles_for_an_h100_node_with_fp8_matmuls():
    """``matmul_quant=fp8`` (qwix, issue "Quantization") for h100-8: the compiled step's weight matmuls take
    float8_e4m3fn operands forward and float8_e5m2 gradients backward (the H100's fp8 tensor-core types)."""
    r = _aot("configs/tiny.py", "h100-8", "--config.model.dtype=bfloat16", "--config.model.matmul_quant=fp8",
             "--config.data.seq_len=128")
    assert r["platform"] == "gpu" and r["matmul_quant"] == "fp8" and r["fits"]
    dots = r["dot_types"]
    assert dots.get("f8e4m3fn x f8e4m3fn", 0) > 0, dots
    assert sum(n for k, n in dots.items() if "f8e5m2" in k) > 0, dots
