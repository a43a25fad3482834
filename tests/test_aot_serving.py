"""AOT proof of fit for serving (``aot.serving``, ``python -m mistral_jax.aot --serve``): the checks made before any
compile, the server's programs compiled for a TPU topology, the KV cache and prefix cache per chip from the config."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mistral_jax import aot, sharding
from mistral_jax.aot import serving
from mistral_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line_error(match: str, **kw):
    """``plan_serving(tiny, **kw)`` raises a one-line ``ServingConfigError`` containing ``match`` and a fix."""
    kw = {"mesh_cfg": {"tensor": 2, "fsdp": -1}, "n_chips": 4, "max_batch": 8, **kw}
    with pytest.raises(serving.ServingConfigError) as e:
        serving.plan_serving(kw.pop("model_cfg", ModelConfig.tiny()), kw.pop("mesh_cfg"), kw.pop("n_chips"), **kw)
    text = str(e.value)
    assert "\n" not in text and match in text and "Fix: " in text, text


def test_a_mesh_that_does_not_divide_is_one_line_before_any_device():
    # tiny: 2 kv heads, 4 heads, dim 64, vocab 512
    _one_line_error("the model's 2 kv heads do not split over the mesh's tensor axis (4 ways",
                    mesh_cfg={"tensor": 4, "fsdp": 1})
    _one_line_error("max_batch=5 decode slots do not split over the 2 ways", max_batch=5)  # fsdp=2 shards the rows
    _one_line_error("multiply to 3 but there are 4 devices", mesh_cfg={"tensor": 3, "fsdp": 1})
    _one_line_error("vocab 511 over 2 ways (embed)", model_cfg=ModelConfig.tiny(vocab_size=511))
    _one_line_error("max_batch=0 must be >= 1", max_batch=0)
    _one_line_error("prefix_cache_mb=-1 must be >= 0", prefix_cache_mb=-1)
    plan = serving.plan_serving(ModelConfig.tiny(), {"data": 2, "tensor": 2, "fsdp": 1}, 4, max_batch=8)
    assert (plan.batch_ways, plan.kv_ways, plan.rules_name, plan.cache_slots, plan.chunk) == (2, 2, "fsdp_tp", 16, 16)
    assert plan.model_cfg.dtype == plan.model_cfg.param_dtype == "bfloat16" and plan.model_cfg.platform == "tpu"
    # without a window the cache holds max_len slots per row, and the chunk is capped at it
    plan = serving.plan_serving(ModelConfig.tiny_mixtral(), {"expert": 2, "fsdp": -1}, 4, max_batch=8, max_len=256)
    assert (plan.cache_slots, plan.chunk, plan.rules_name, plan.model_cfg.max_seq_len) == (256, 256, "fsdp_tp_ep", 256)


def test_weights_and_cache_beyond_hbm_are_one_line_before_compiling(monkeypatch):
    """Mistral 7B v0.3 (no window) at 32k with 64 slots needs a 32 GiB KV cache per v5e chip: refused before any
    compile, naming how many rows would fit."""
    def no_compile(*a, **k):
        raise AssertionError("compiled although the weights and the cache alone exceed HBM")

    monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
    topo = aot.parse_topology("v5e-8")
    plan = serving.plan_serving(ModelConfig.mistral_7b_v03(), {"tensor": 8, "fsdp": 1}, topo.chips, max_batch=64,
                                max_len=32768)
    with pytest.raises(serving.ServingConfigError) as e:
        serving.compile_serving(plan, aot.topology_devices(topo), topo.hbm_bytes)
    text = str(e.value)
    assert "\n" not in text and "KV cache 32.00 GiB (64 rows x 32768 slots)" in text, text
    assert "of HBM of each of the 8 chips" in text and "at most 28 fit before temporaries" in text, text


@pytest.mark.heavy
def test_serving_programs_compile_for_a_tpu_topology():
    """Tiny Mistral on a v5e-4 with 2 batch x 2 tensor ways: the decode loop and the prefill chunk compile; the KV
    cache per chip is the config's L * B * S * K * H * 2 * bytes over the 4 chips, the prefix cache the snapshots
    the budget holds, each split over the kv-head ways as ``decode.cache_row`` lays it out."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mistral_jax.inference import decode
    from mistral_jax.model.kv_cache import KVCache

    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    topo = aot.parse_topology("v5e-4")
    devices = aot.topology_devices(topo)
    cfg = ModelConfig.tiny()
    b, budget_mb = 8, 1
    plan = serving.plan_serving(cfg, {"data": 2, "tensor": 2, "fsdp": 1}, topo.chips, max_batch=b,
                                prefix_cache_mb=budget_mb)
    r = serving.compile_serving(plan, devices, topo.hbm_bytes)
    s, itemsize = cfg.sliding_window, 2  # the cache holds the window; bfloat16
    row = cfg.n_layers * s * cfg.n_kv_heads * cfg.head_dim * 2 * itemsize  # k and v of one row
    assert r["kv_cache"] == b * row // topo.chips  # rows over data, kv heads over tensor
    assert r["cache_positions"] == b * s * 4 // 2  # int32 [B, S], rows over data
    assert r["params"] == 139_584 and r["params"] * itemsize // 2 <= r["weights"] < r["params"] * itemsize  # tensor=2
    assert r["mesh"] == {"data": 2, "fsdp": 1, "context": 1, "tensor": 2, "expert": 1} and r["platform"] == "tpu"
    for name in ("decode", "prefill"):
        p = r[name]
        assert p["arguments"] >= r["weights"] + r["kv_cache"] + r["cache_positions"], (name, p)
        assert p["aliased"] >= r["kv_cache"] + r["cache_positions"], (name, p)  # the donated cache (TPU tiles pad it)
        assert p["temps"] > 0 and p["total"] == p["arguments"] + p["outputs"] - p["aliased"] + p["temps"] + p["code"]
    # the prefix cache: snapshots of k, v and positions, as the engine charges them; split over tensor only
    snapshot = row + s * 4
    assert r["snapshot_bytes"] == snapshot and r["prefix_cache_rows"] == budget_mb * 2**20 // snapshot
    assert r["prefix_cache"] == r["prefix_cache_rows"] * (row // 2 + s * 4) and r["prefix_ways"] == 2
    ac = jax.eval_shape(lambda: KVCache.init(plan.model_cfg, b, s))
    mesh = sharding.make_mesh(**plan.mesh_sizes, devices=devices)
    cache = serving._abstract(ac, ac.shardings(mesh, plan.rules))
    with sharding.use_mesh(mesh, plan.rules):
        snap = decode.cache_row.lower(cache, jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(
            mesh, PartitionSpec()))).compile()
    per_chip = sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
                   for x, sh in zip(jax.tree.leaves(jax.eval_shape(decode.cache_row, ac, 0)),
                                    jax.tree.leaves(snap.output_shardings), strict=True))
    assert per_chip == row // 2 + s * 4  # what the engine's snapshots take on each chip
    assert r["total"] == max(r["decode"]["total"], r["prefill"]["total"]) + r["prefix_cache"] and r["fits"]
    text = serving.format_serving_report(r, "tiny")
    assert "FITS" in text and "8 decode slots x 16 cache slots" in text and "decode loop [8]" in text, text


@pytest.mark.heavy
def test_int8_weights_and_kv_cache_hold_about_half_the_bfloat16_bytes_per_chip():
    """``--quantize int8`` with ``kv_cache_dtype=int8`` (what mistral-jax-serve runs with those flags): the weights
    per chip are int8 plus float32 per-channel scales, the KV cache int8 plus one float32 scale per slot and kv head;
    both programs compile for the TPU topology and take int8 arguments."""
    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    topo = aot.parse_topology("v5e-4")
    cfg = ModelConfig.tiny()
    mesh, b = {"data": 2, "tensor": 2, "fsdp": 1}, 8

    def report(model_cfg, quantize):
        plan = serving.plan_serving(model_cfg, mesh, topo.chips, max_batch=b, prefix_cache_mb=0)
        return serving.compile_serving(plan, aot.topology_devices(topo), topo.hbm_bytes, quantize=quantize)

    bf16, q = report(cfg, None), report(cfg.replace(kv_cache_dtype="int8"), "int8")
    s = cfg.sliding_window
    scales = cfg.n_layers * b * s * cfg.n_kv_heads * 2 * 4 // topo.chips  # k and v: float32 per slot and kv head
    assert q["kv_cache"] == bf16["kv_cache"] // 2 + scales, (q["kv_cache"], bf16["kv_cache"])
    assert q["params"] == bf16["params"] and (q["quantize"], q["kv_cache_dtype"]) == ("int8", "int8")
    # the projections and the head in int8 (+ scales); the embedding and the norms stay bfloat16
    assert 0.5 * bf16["weights"] < q["weights"] < 0.75 * bf16["weights"], (q["weights"], bf16["weights"])
    for name in ("decode", "prefill"):
        assert q[name]["arguments"] < bf16[name]["arguments"] and q[name]["temps"] > 0, name
    text = serving.format_serving_report(q, "tiny")
    assert "dtype bfloat16, weights int8, KV cache int8, attention" in text, text
    assert "weights int8" not in serving.format_serving_report(bf16, "tiny")


@pytest.mark.parametrize("argv, expected", [
    (["--serve", "--mesh", "tensor=4"], "the model's 2 kv heads do not split over the mesh's tensor axis"),
    (["--serve", "--mesh", "tensor=3"], "--mesh='tensor=3' does not lay out the 4 chips of v5e-4"),
    (["--max_batch", "8"], "--max_batch=8 only applies to a serving check. Fix: add --serve"),
    (["--serve", "--quantize", "int4"], "--quantize='int4' is not a weight quantization mode. Fix: pass --quantize"),
])
@pytest.mark.heavy
def test_cli_bad_serving_values_are_one_line(argv, expected):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--topology", "v5e-4",
                          *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("aot: ")]
    assert len(lines) == 1 and expected in lines[0] and "Fix: " in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_mistral_7b_serves_64_rows_at_32k_on_a_v5e_8():
    """The README's serving row: Mistral 7B (window 4096) in bfloat16, tensor=8 on a v5e-8, 64 slots, max_len 32768,
    a 1 GiB prefix cache (about 30 s on 2 CPU cores)."""
    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    topo = aot.parse_topology("v5e-8")
    plan = serving.plan_serving(ModelConfig.mistral_7b_v01(), {"tensor": 8, "fsdp": 1}, topo.chips, max_batch=64,
                                max_len=32768, prefix_cache_mb=1024)
    r = serving.compile_serving(plan, aot.topology_devices(topo), topo.hbm_bytes)
    assert r["kv_cache"] == 32 * 64 * 4096 * 8 * 128 * 2 * 2 // 8 == 4 * 2**30  # S = W however long max_len
    assert r["prefix_cache_rows"] == 1  # a 512 MiB row plus its positions: two do not fit in 1024 MiB
    assert abs(r["weights"] - 7_241_732_096 * 2 / 8) < 0.01 * r["weights"]  # norms replicated, the rest split 8 ways
    for name in ("decode", "prefill"):  # the donated cache is updated in place (no padding at these shapes)
        assert abs(r[name]["aliased"] - r["kv_cache"] - r["cache_positions"]) < 0.001 * r["kv_cache"], r[name]
    assert r["fits"] and r["total"] < 10 * 2**30, serving.format_serving_report(r, "mistral 7b")
