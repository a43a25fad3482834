"""AOT proof of fit: topology parsing, the memory report (CPU path), a tiny TPU compile (libtpu: test extra)."""

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from mistral_jax import aot


def test_parse_topology():
    t = aot.parse_topology("v5p-128")  # 128 TensorCores = 64 chips
    assert (t.libtpu_name, t.chips, t.hbm_bytes) == ("v5p:4x4x4", 64, 95 * aot.GiB)
    assert aot.parse_topology("v5p-8").libtpu_name == "v5p:2x2x1"
    t = aot.parse_topology("v6e-256")  # v6e counts chips
    assert (t.libtpu_name, t.chips, t.hbm_bytes) == ("v6e:16x16", 256, 32 * aot.GiB)
    assert aot.parse_topology("v5p:2x2x4").chips == 16
    with pytest.raises(ValueError, match="unknown TPU topology 'h100-8'"):
        aot.parse_topology("h100-8")
    with pytest.raises(ValueError, match="no known chip grid for 'v5p-6'"):
        aot.parse_topology("v5p-6")


def test_memory_report_on_cpu():
    m, k, n = 256, 512, 128
    fn = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b.T, donate_argnums=(0,))
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    compiled = fn.lower(a, b).compile()
    r = aot.memory_report(compiled, hbm_bytes=10**9)
    assert r["arguments"] == 4 * (m * k + k * n)
    assert r["outputs"] == 4 * m * k
    assert r["total"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temps"] + r["code"]
    assert r["temps"] >= 4 * m * n  # the [m, n] intermediate lives in a temporary buffer
    assert r["fits"] is True
    assert 2 * (2 * m * k * n) <= r["flops"] < 3 * (2 * m * k * n)  # two matmuls (+ elementwise)
    assert aot.memory_report(compiled, hbm_bytes=r["total"] - 1)["fits"] is False
    assert aot.memory_report(compiled)["fits"] is None


@pytest.mark.slow
def test_aot_compiles_tiny_mixtral_for_a_tpu_topology():
    # libtpu comes with the test extra (jax[tpu] installs and compiles for TPU topologies on any CPU machine), so
    # this test runs everywhere the tests do; a missing libtpu fails here instead of skipping silently.
    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    cfg = tiny.get_config()
    cfg.model.preset = "tiny_mixtral"
    cfg.data.seq_len = 128
    cfg.mesh.fsdp, cfg.mesh.expert = -1, 2
    topo = aot.parse_topology("v5p-8")
    devices = aot.topology_devices(topo)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    r = aot.compile_train_step(cfg, devices)
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 2}
    assert 0 < r["total"] < topo.hbm_bytes
    # XLA's per-chip FLOPs agree with the analytic 6 * N * tokens (+ attention) estimate to within 2x.
    assert 0.5 < r["flops"] / r["model_flops_per_chip"] < 2.0
    text = aot.format_report({**r, "hbm": topo.hbm_bytes, "fits": True}, "tiny")
    assert "FITS" in text and "4 chips" in text


def test_compiler_out_of_memory_becomes_a_does_not_fit_report():
    err = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                       "(193.44G) exceeds available HBM (95.74G).")
    r = aot._oom_report(err)
    assert r["fits"] is False and abs(r["total"] / aot.GiB - 193.44) < 0.01
    with pytest.raises(RuntimeError, match="something else"):
        aot._oom_report(RuntimeError("something else"))


@pytest.mark.slow
def test_lora_config_compiles_the_lora_program_with_less_state():
    """A LoRA config compiles the LoRA program: adapters trained, base frozen and out of the optimizer, so its
    optimizer state and arguments are smaller than full fine-tuning's of the same model (8 CPU devices)."""
    def report(**overrides):
        cfg = tiny.get_config()
        cfg.data.seq_len, cfg.batch_size = 32, 8
        cfg.update_from_flattened_dict(overrides)
        return aot.compile_train_step(cfg, jax.devices())

    # a fine-tuning config compiles without its checkpoint: config.model's architecture, said in the report
    full, lora = report(), report(**{"lora.rank": 4, "lora.targets": "wq,wv", "init_from": "/nowhere"})
    assert "note" not in full and "'/nowhere' is not a directory here" in lora["note"]
    assert full["frozen_params"] == 0 and full["state"]["frozen"] == 0
    assert lora["frozen_params"] == full["trainable_params"]  # the whole base, frozen
    assert 0 < lora["trainable_params"] < full["trainable_params"] // 10  # rank-4 adapters on wq, wv
    assert lora["state"]["opt_state"] < full["state"]["opt_state"] // 5  # Adam moments of the adapters only
    assert lora["arguments"] < full["arguments"]
    assert full["platform"] == lora["platform"] == "cpu"  # the devices' platform
    assert "LoRA rank 4 on wq,wv" in lora["recipe"]
    text = aot.format_report({**lora, "hbm": 10**9, "fits": True}, "tiny lora")
    assert "frozen" in text and "optimizer" in text and "note: config.init_from='/nowhere'" in text
