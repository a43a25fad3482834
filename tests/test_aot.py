"""AOT proof of fit: topology parsing, the memory report (CPU path), a tiny TPU compile (libtpu: test extra)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mistral_jax import aot
from mistral_jax.aot import hlo, roofline


def test_parse_topology():
    t = aot.parse_topology("v5p-128")  # 128 TensorCores = 64 chips
    assert (t.libtpu_name, t.chips, t.hbm_bytes) == ("v5p:4x4x4", 64, 95 * aot.GiB)
    assert aot.parse_topology("v5p-8").libtpu_name == "v5p:2x2x1"
    t = aot.parse_topology("v6e-256")  # v6e counts chips
    assert (t.libtpu_name, t.chips, t.hbm_bytes) == ("v6e:16x16", 256, 32 * aot.GiB)
    assert aot.parse_topology("v5p:2x2x4").chips == 16
    with pytest.raises(ValueError, match="unknown TPU topology 'a100-8'.*GPU nodes: h100-8"):
        aot.parse_topology("a100-8")  # GPU nodes: h100 / h200 (tests/test_gpu_aot.py)
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
    assert r["mesh"] == {"data": 1, "fsdp": 2, "context": 1, "tensor": 1, "expert": 2}
    assert 0 < r["total"] < topo.hbm_bytes
    # XLA's per-chip FLOPs agree with the analytic 6 * N * tokens (+ attention) estimate to within 2x.
    assert 0.5 < r["flops"] / r["model_flops_per_chip"] < 2.0
    assert all(r[k] > 0 for k in ("arguments", "outputs", "aliased", "temps", "code"))
    assert r["total"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temps"] + r["code"]
    # FSDP over 2 chips: every step all-gathers the weights, at least once each (forward), and reduces gradients
    assert set(r["collectives"]) == set(hlo.KINDS) and r["collective_loops_counted_once"] == []
    assert r["collectives"]["all-gather"]["bytes"] >= r["state"]["params"] * (2 - 1)
    assert r["collectives"]["reduce-scatter"]["count"] + r["collectives"]["all-reduce"]["count"] > 0
    # the step reads its weights and optimizer state from HBM and writes them back, at least
    assert r["hbm_bytes"] >= 2 * (r["state"]["params"] + r["state"]["opt_state"])
    rl = r["roofline"]
    assert rl["generation"] == "v5p" and rl["hbm_s"] == r["hbm_bytes"] / 2765e9
    assert rl["compute_s"] == r["model_flops_per_chip"] / 459e12 and rl["collectives_s"] > 0
    assert rl["step_s"] == max(rl["compute_s"], rl["collectives_s"], rl["hbm_s"]) and 0 < rl["mfu"] <= 1
    text = aot.format_report({**r, "hbm": topo.hbm_bytes, "fits": True}, "tiny")
    assert "FITS" in text and "4 chips" in text
    assert "collectives per step per chip: all-gather" in text and "roofline (v5p: 459 TFLOP/s bf16" in text
    assert f"HBM {aot._seconds(rl['hbm_s'])} ({hlo.size(r['hbm_bytes'])})" in text


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
    assert full["collectives"]["all-reduce"]["count"] > 0 and full["roofline"] is None  # no peak figures for a CPU
    assert full["hbm_bytes"] > lora["hbm_bytes"] > 0  # full fine-tuning also updates every weight and its moments
    assert "LoRA rank 4 on wq,wv" in lora["recipe"]
    text = aot.format_report({**lora, "hbm": 10**9, "fits": True}, "tiny lora")
    assert "frozen" in text and "optimizer" in text and "note: config.init_from='/nowhere'" in text


# ------------------------------------------------------------------------------------------ collectives (aot.hlo)
# A hand-written module, 8 devices: two while loops over one body (trip counts 4, inferred from the condition and
# the start value, and 3, recorded by XLA), async all-reduce / collective-permute, a tuple all-to-all, a ragged
# all-to-all, a conditional and an async-wrapped reduce-scatter.
HLO = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64]{0} get-tuple-element(%p), index=1
  %ag = f32[256]{0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[64]{0} reduce-scatter(%ag), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64]{0}) tuple(%next, %rs)
}

%cond (p: (s32[], f32[64])) -> pred[] {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%gather_branch (y: f32[64]) -> f32[64] {
  %y = f32[64]{0} parameter(0)
  %g = f32[128]{0} all-gather(%y), replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  ROOT %h = f32[64]{0} slice(%g), slice={[0:64]}
}

%quiet_branch (y: f32[64]) -> f32[64] {
  ROOT %y = f32[64]{0} parameter(0)
}

%wrapped_rs (p0: f32[64]) -> f32[16] {
  %p0 = f32[64]{0} parameter(0)
  ROOT %rs2 = f32[16]{0} reduce-scatter(%p0), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[64], tokens: bf16[40,8], k: s32[]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  %start = s32[] constant(2)
  %init = s32[] copy(%start)
  %t = (s32[], f32[64]{0}) tuple(%init, %x)
  %w = (s32[], f32[64]{0}) while(%t), condition=%cond, body=%body
  %known = (s32[], f32[64]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[64]{0} get-tuple-element(%w), index=1
  %ars = f32[64]{0:T(128)S(1)} all-reduce-start(%y), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'y'}, to_apply=%add
  %ard = f32[64]{0} all-reduce-done(%ars)
  %cps = (f32[64]{0}, f32[64]{0}, u32[], u32[]) collective-permute-start(%ard), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[64]{0} collective-permute-done(%cps)
  %lo = f32[16]{0} slice(%cpd), slice={[0:16]}
  %a2a = (f32[16]{0}, /*index=1*/f32[16]{0}) all-to-all(%lo, %lo), replica_groups={{0,1},{2,3},{4,5},{6,7}}
  %tokens = bf16[40,8]{1,0} parameter(1)
  %out = bf16[100,8]{1,0} broadcast(%start), dimensions={}
  %offsets = s32[8]{0} broadcast(%start), dimensions={}
  %ragged = bf16[100,8]{1,0} ragged-all-to-all(%tokens, %out, %offsets, %offsets, %offsets, %offsets), replica_groups={}
  %k = s32[] parameter(2)
  %c = f32[64]{0} conditional(%k, %cpd, %cpd), branch_computations={%quiet_branch, %gather_branch}
  %as = ((f32[64]{0}), f32[16]{0}, u32[]) async-start(%c), calls=%wrapped_rs
  %ad = f32[16]{0} async-done(%as), calls=%wrapped_rs
  ROOT %r = f32[64]{0} add(%c, %y)
}
"""


def test_collective_traffic_of_a_hand_written_module():
    t = hlo.collective_traffic(HLO)
    body = 4 + 3  # the loop body runs 4 times (2 <= i < 6) in one loop, 3 (known_trip_count) in the other
    assert t.kinds["all-gather"] == {"count": body + 1, "bytes": body * 1024 * 3 / 4 + 512 * 1 / 2}  # + the branch
    assert t.kinds["reduce-scatter"] == {"count": body + 1, "bytes": body * 256 * 3 + 64 * 3}  # + the async one
    assert t.kinds["all-reduce"] == {"count": 1, "bytes": 2 * 256 * 3 / 4}  # group: mesh axis y of size 4
    assert t.kinds["collective-permute"] == {"count": 1, "bytes": 256}
    assert t.kinds["all-to-all"] == {"count": 1, "bytes": 2 * 64 / 2}  # two buffers, groups of 2
    ragged = t.kinds["ragged-all-to-all"]  # replica_groups={}: all 8 devices
    assert ragged == {"count": 1, "bytes": 40 * 8 * 2 * 7 / 8, "bytes_upper_bound": 100 * 8 * 2 * 7 / 8}
    assert t.uncounted_loops == []
    assert t.bytes_upper_bound - t.bytes == (100 - 40) * 8 * 2 * 7 / 8
    assert "all-gather 8x 5.50 KiB" in hlo.describe(t)


def test_a_callee_the_parser_does_not_know_is_named_not_a_crash():
    """A while body missing from the parsed computations (seen with a megablox program on libtpu 0.0.52) is
    skipped and named in ``uncounted_loops`` by both walks, instead of a KeyError ending the report."""
    text = HLO.replace("condition=%cond, body=%body, backend_config", "condition=%cond, body=%gone, backend_config")
    t = hlo.collective_traffic(text)
    assert t.uncounted_loops == ["gone"]
    assert t.kinds["all-gather"]["count"] == 4 + 1  # the other loop and the branch still count
    assert hlo.hbm_traffic(text).uncounted_loops == ["gone"]


def test_a_loop_of_unknown_trip_count_is_counted_once_and_named():
    text = HLO.replace("%n = s32[] constant(6)", "%n = s32[] get-tuple-element(%p), index=0").replace(
        ', backend_config={"known_trip_count":{"n":"3"}}', "")
    t = hlo.collective_traffic(text)
    assert t.uncounted_loops == ["known", "w"]
    assert t.kinds["all-gather"]["count"] == 2 + 1


@pytest.mark.parametrize("attrs, size", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 4),
    ("replica_groups={}, dimensions={0}", 128),
    ("dimensions={0}", 128),
    ("replica_groups=[8,16]<=[128], dimensions={0}", 16),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", 2),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}", 4),
    ("replica_groups=mesh['a'=4,'b'=2,'c'=2] {'a','c'}, dimensions={0}", 8),
    ("replica_groups=mesh['a'=1,'b'=2,'c'=2], device_ids=([2,2]T(1,0)) {'a','b','c'}, use_global_device_ids=true", 4),
    ("replica_groups=mesh['a'=8] {'a':(1)2}, dimensions={0}", 2),
])
def test_replica_group_sizes(attrs, size):
    assert hlo.group_size(attrs, devices=128) == size


def test_shape_bytes():
    assert hlo.shape_bytes("bf16[4,16,64]{1,0,2:T(4,128)(2,1)}") == 4 * 16 * 64 * 2
    assert hlo.shape_bytes("(f32[], s8[10], pred[3], /*index=3*/f8e4m3fn[2], s4[4], token[])") == 4 + 10 + 3 + 2 + 2
    with pytest.raises(ValueError, match="unknown HLO element type 'q7'"):
        hlo.shape_bytes("q7[3]")


def _scanned_all_gather(mesh, steps):
    """A jitted shard_map whose scan all-gathers one [16, 64] f32 slice (shard [16 / n, 64]) per step."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def body(c, w):
        return c + jnp.sum(jnp.sin(jax.lax.all_gather(w, "x", tiled=True)) * c), None

    fn = jax.jit(jax.shard_map(lambda c, ws: jax.lax.scan(body, c, ws)[0], mesh=mesh, in_specs=(P(), P(None, "x")),
                               out_specs=P(), check_vma=False))
    c = jax.ShapeDtypeStruct((64,), jnp.float32, sharding=NamedSharding(mesh, P()))
    ws = jax.ShapeDtypeStruct((steps, 16, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "x")))
    return fn.lower(c, ws).compile()


def test_collectives_of_a_cpu_compile_count_the_scan():
    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices())
    t = hlo.collective_traffic(_scanned_all_gather(mesh, steps=5).as_text())
    assert t.kinds["all-gather"] == {"count": 5, "bytes": 5 * 16 * 64 * 4 * 7 / 8}
    assert t.uncounted_loops == []


def test_collectives_of_a_tpu_compile_count_the_scan():
    # optimized TPU HLO records no known_trip_count on this loop: the count is inferred from its condition
    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    mesh = jax.make_mesh((4,), ("x",), devices=aot.topology_devices(aot.parse_topology("v5p-8")))
    t = hlo.collective_traffic(_scanned_all_gather(mesh, steps=7).as_text())
    assert t.kinds["all-gather"] == {"count": 7, "bytes": 7 * 16 * 64 * 4 * 3 / 4}
    assert t.uncounted_loops == []


def test_roofline():
    r = roofline.estimate("v5p", model_flops_per_chip=459e12, collective_bytes_per_chip=300e9)
    assert (r["compute_s"], r["collectives_s"], r["step_s"], r["bound"], r["mfu"]) == (1.0, 0.5, 1.0, "compute", 1.0)
    assert r["hbm_s"] is None  # no HBM figure: no HBM term
    r = roofline.estimate("v5e", model_flops_per_chip=197e12, collective_bytes_per_chip=400e9)
    assert (r["step_s"], r["bound"], r["mfu"], r["hbm_s"]) == (2.0, "collectives", 0.5, None)
    r = roofline.estimate("v5p", 459e12, 300e9, hbm_bytes_per_chip=2765e9 / 4)
    assert (r["hbm_s"], r["step_s"], r["bound"]) == (0.25, 1.0, "compute")
    r = roofline.estimate("v5p", 459e12, 300e9, hbm_bytes_per_chip=2 * 2765e9)
    assert (r["hbm_s"], r["step_s"], r["bound"], r["mfu"]) == (2.0, 2.0, "hbm", 0.5)
    with pytest.raises(ValueError, match="no peak figures for TPU generation 'v9'"):
        roofline.estimate("v9", 1.0, 1.0)
    assert roofline.generation_of(jax.devices()[0]) is None  # CPU


def _moe_block_traffic(dispatch: str) -> tuple[dict, str]:
    """Collective traffic of the expert-parallel MoE block alone (forward and backward), compiled for the 8 chips of
    a v5p-16 with the 8 experts over ``mesh.expert = 8`` (no FSDP: only the dispatch moves data)."""
    from flax import nnx
    from jax.sharding import NamedSharding

    import mistral_jax as mj
    from mistral_jax import sharding as sh
    from mistral_jax.model import backends, moe

    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    devices = aot.topology_devices(aot.parse_topology("v5p-16"))
    mesh = sh.make_mesh(fsdp=1, expert=8, devices=devices)
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=8, num_experts_per_tok=2, dim=256, hidden_dim=512, dtype="bfloat16",
                                      moe_dispatch=dispatch, platform="tpu")
    rules = sh.rules_preset("fsdp_tp_ep")
    # (the TPU grouped-matmul kernel takes bfloat16 at default precision; conftest asks for "highest" on CPU)
    with sh.use_mesh(mesh, rules), jax.default_matmul_precision("default"):
        on_mesh = backends.resolve(cfg, mesh, rules)  # the model's backends, chosen for this mesh
        graphdef, params = nnx.split(nnx.eval_shape(lambda: moe.MoE(cfg, rngs=nnx.Rngs(0), backends=on_mesh)))
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
                              params, nnx.get_partition_spec(params))
        x = jax.ShapeDtypeStruct((16, 1024, cfg.dim), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, rules.spec(("batch", "seq", "act_embed"), mesh)))
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)[0].astype(jnp.float32) ** 2)
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    return hlo.collective_traffic(text).kinds, text


@pytest.mark.heavy
def test_all_to_all_dispatch_moves_at_most_a_third_of_the_all_gather_bytes():
    """Top-2 of 8 experts on 8 chips: the ragged all-to-all sends each token to its 2 experts' chips (and back), the
    all-gather path gathers all tokens to every chip and reduces the outputs: at most a third, and 0.166 measured."""
    a2a, a2a_text = _moe_block_traffic("all_to_all")
    gather, gather_text = _moe_block_traffic("all_gather")
    assert "ragged-all-to-all" in a2a_text and "ragged-all-to-all" not in gather_text
    total = lambda kinds: sum(v["bytes"] for v in kinds.values())
    assert a2a["ragged-all-to-all"]["count"] == 4  # dispatch and combine, forward and backward
    assert total(a2a) <= total(gather) / 3, (a2a, gather)
    # Exactly: per chip, 16 x 1024 / 8 tokens x top-2 rows of 256 bfloat16 values, the 7/8 of them whose expert is
    # on another chip, in each of the 4 exchanges. The all-gather path: 7/8 of every chip's tokens gathered twice
    # plus the all-reduces of the outputs and their gradient (44.3 MB). Measured 0.1659 on jax 0.10.2 /
    # libtpu 0.0.42.1 and jax 0.12.0.1 / libtpu 0.0.50.1 alike; 1% either way.
    assert a2a["ragged-all-to-all"]["bytes"] == 4 * (16 * 1024 // 8) * 2 * 256 * 2 * 7 // 8
    assert total(a2a) / total(gather) == pytest.approx(0.1659, rel=0.01), (a2a, gather)


# ------------------------------------------------------------------------------------------- HBM traffic (aot.hlo)
# A hand-written module: a while loop (trip count 8, inferred) whose body reads one row of a stacked weight through
# a nested fusion's dynamic-slice and updates one row of a stacked buffer in place; a multi-output fusion with one
# output in VMEM (S(1)); top-level slicing / in-place ops; sync and async collectives; prefetches to VMEM and host
# (S(5)); a conditional, a call and an async-wrapped reduce-scatter (some attributes abridged).
HBM_HLO = """HloModule hbm, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_slice (p0: f32[8,256], p1: s32[]) -> f32[256] {
  %p0 = f32[8,256]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={1,256}
  ROOT %row = f32[256]{0} bitcast(%ds)
}

%fused_layer (a: f32[256], w: f32[8,256], i: s32[]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %w = f32[8,256]{1,0:T(8,128)} parameter(1)
  %i = s32[] parameter(2)
  %row = f32[256]{0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  ROOT %m = f32[256]{0} multiply(%a, %row)
}

%fused_update (buf: f32[8,256], x: f32[256], i: s32[]) -> f32[8,256] {
  %buf = f32[8,256]{1,0} parameter(0)
  %x = f32[256]{0} parameter(1)
  %i = s32[] parameter(2)
  %neg = f32[256]{0} negate(%x)
  %upd = f32[1,256]{1,0} bitcast(%neg)
  %zero = s32[] constant(0)
  ROOT %dus = f32[8,256]{1,0} dynamic-update-slice(%buf, %upd, %i, %zero)
}

%body (s: (s32[], f32[256], f32[8,256], f32[8,256])) -> (s32[], f32[256], f32[8,256], f32[8,256]) {
  %s = (s32[], f32[256]{0}, f32[8,256]{1,0}, f32[8,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %h = f32[256]{0} get-tuple-element(%s), index=1
  %w = f32[8,256]{1,0} get-tuple-element(%s), index=2
  %acts = f32[8,256]{1,0} get-tuple-element(%s), index=3
  %h2 = f32[256]{0} fusion(%h, %w, %i), kind=kOutput, calls=%fused_layer
  %acts2 = f32[8,256]{1,0} fusion(%acts, %h2, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[256]{0}, f32[8,256]{1,0}, f32[8,256]{1,0}) tuple(%next, %h2, %w, %acts2)
}

%cond (s: (s32[], f32[256], f32[8,256], f32[8,256])) -> pred[] {
  %s = (s32[], f32[256]{0}, f32[8,256]{1,0}, f32[8,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%fused_two (p: f32[256]) -> (f32[256], bf16[256]) {
  %p = f32[256]{0} parameter(0)
  %e = f32[256]{0} exponential(%p)
  %c = bf16[256]{0} convert(%p)
  ROOT %t = (f32[256]{0}, bf16[256]{0}) tuple(%e, %c)
}

%cheap (y: f32[1024]) -> f32[1024] {
  ROOT %y = f32[1024]{0} parameter(0)
}

%dear (y: f32[1024]) -> f32[1024] {
  %y = f32[1024]{0} parameter(0)
  ROOT %n = f32[1024]{0} negate(%y)
}

%called (y: f32[1024]) -> f32[1024] {
  %y = f32[1024]{0} parameter(0)
  ROOT %r = f32[1024]{0} sqrt(%y)
}

%wrapped_rs (p0: f32[1024]) -> f32[256] {
  %p0 = f32[1024]{0} parameter(0)
  ROOT %rs = f32[256]{0} reduce-scatter(%p0), replica_groups={}, dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[256], w: f32[8,256], idx: s32[16], tab: f32[1024,256], k: s32[], big: f32[4096]) -> f32[] {
  %x = f32[256]{0} parameter(0)
  %w = f32[8,256]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = s32[] copy(%zero)
  %acts0 = f32[8,256]{1,0} broadcast(%x), dimensions={1}
  %st = (s32[], f32[256]{0}, f32[8,256]{1,0}, f32[8,256]{1,0}) tuple(%init, %x, %w, %acts0)
  %loop = (s32[], f32[256]{0}, f32[8,256]{1,0}, f32[8,256]{1,0}) while(%st), condition=%cond, body=%body
  %h = f32[256]{0} get-tuple-element(%loop), index=1
  %acts = f32[8,256]{1,0} get-tuple-element(%loop), index=3
  %two = (f32[256]{0}, bf16[256]{0:T(256)S(1)}) fusion(%h), kind=kLoop, calls=%fused_two
  %e = f32[256]{0} get-tuple-element(%two), index=0
  %ds = f32[2,256]{1,0} dynamic-slice(%acts, %zero, %zero), dynamic_slice_sizes={2,256}
  %dus = f32[8,256]{1,0} dynamic-update-slice(%acts, %ds, %zero, %zero)
  %idx = s32[16]{0} parameter(2)
  %tab = f32[1024,256]{1,0} parameter(3)
  %g = f32[16,256]{1,0} gather(%tab, %idx), offset_dims={1}, collapsed_slice_dims={0}, slice_sizes={1,256}
  %sc = f32[1024,256]{1,0} scatter(%tab, %idx, %g), update_window_dims={1}, inserted_window_dims={0}, to_apply=%add
  %ag = f32[1024]{0} all-gather(%e), replica_groups={}, dimensions={0}
  %ags = (f32[256]{0}, f32[1024]{0}) all-gather-start(%e), replica_groups={}, dimensions={0}
  %agd = f32[1024]{0} all-gather-done(%ags)
  %big = f32[4096]{0} parameter(5)
  %pre = (f32[4096]{0:S(1)}, f32[4096]{0}, u32[]{:S(2)}) copy-start(%big)
  %vm = f32[4096]{0:S(1)} copy-done(%pre)
  %off = (f32[4096]{0:S(5)}, f32[4096]{0}, u32[]{:S(2)}) copy-start(%big)
  %host = f32[4096]{0:S(5)} copy-done(%off)
  %sum = f32[4096]{0} add(%vm, %big)
  %k = s32[] parameter(4)
  %c = f32[1024]{0} conditional(%k, %agd, %agd), branch_computations={%cheap, %dear}
  %cl = f32[1024]{0} call(%c), to_apply=%called
  %as = ((f32[1024]{0}), f32[256]{0}, u32[]) async-start(%cl), calls=%wrapped_rs
  %ad = f32[256]{0} async-done(%as), calls=%wrapped_rs
  ROOT %out = (f32[8,256], f32[1024,256], f32[256], f32[4096], f32[4096]{0:S(5)}) tuple(%dus, %sc, %ad, %sum, %host)
}
"""


def test_hbm_traffic_of_a_hand_written_module():
    t = hlo.hbm_traffic(HBM_HLO)
    row, s32 = 256 * 4, 4
    body = ((row + row + s32 + row)  # %h2: h, row i of w (dynamic-slice in a nested fusion, not all 8 rows), i; out
            + (0 + row + s32 + row)  # %acts2: the buffer is updated in place (not read), h2 and i read, one row out
            + 3 * s32)  # %next = add(i, 1)
    cond = s32 + s32 + 1  # compare(i, 8) -> pred
    entry = {
        "copy": 2 * s32,  # %init
        "broadcast": row + 8 * row,
        "while": 8 * body + 9 * cond,  # 0 <= i < 8: the body runs 8 times, the condition 9
        "fusion": row + row,  # %two reads h and writes e; its bf16 output lives in VMEM (S(1)): not HBM
        "dynamic-slice": 2 * row + 2 * s32 + 2 * row,  # reads the 2 rows it slices (and 2 indices), writes them
        "dynamic-update-slice": 2 * row + 2 * s32 + 2 * row,  # reads the update (not the buffer), writes 2 rows
        "gather": 16 * row + 16 * s32 + 16 * row,  # the 16 rows gathered and the indices; writes the 16 rows
        "scatter": 16 * row + 16 * s32 + 16 * row + 16 * row,  # target rows, indices, updates; writes the rows
        "all-gather": row + 4 * row,  # operand and result buffer
        "all-gather-start": row + 4 * row,  # the same, asynchronous (the -done moves nothing)
        "copy-start": 4096 * 4 * 2,  # two reads of big: the prefetch to VMEM and the copy to host write no HBM
        "add": 0 + 4096 * 4 + 4096 * 4,  # vm is in VMEM: only big is read from HBM
        "conditional": 4 * row + 4 * row,  # the costlier branch: negate
        "call": 4 * row + 4 * row,  # sqrt
        "async-start": 4 * row + row,  # the wrapped reduce-scatter: operand and result
    }
    assert t.bytes == sum(entry.values())
    assert t.uncounted_loops == []
    assert t.by_opcode["dynamic-update-slice"] == entry["dynamic-update-slice"]
    assert t.by_opcode["scatter"] == entry["scatter"] and t.by_opcode["copy-start"] == entry["copy-start"]
    assert t.by_opcode["fusion"] == entry["fusion"] + 8 * (body - 3 * s32)
    # a loop of unknown trip count is counted once and named
    unknown = hlo.hbm_traffic(HBM_HLO.replace("%n = s32[] constant(8)", "%n = s32[] get-tuple-element(%s), index=0"))
    assert unknown.uncounted_loops == ["loop"]
    assert unknown.bytes == t.bytes - 7 * body - 7 * cond  # the body once, the condition twice


def _single_device(target: str):
    """A sharding on one CPU device or on one chip of a compile-only v5p-8 (libtpu)."""
    from jax.sharding import SingleDeviceSharding

    if target == "cpu":
        return SingleDeviceSharding(jax.devices()[0])
    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    return SingleDeviceSharding(aot.topology_devices(aot.parse_topology("v5p-8"))[0])


def _hbm_vs_xla(fn, target, *shapes):
    """(our HBM bytes, XLA's cost-analysis bytes accessed) of ``fn`` compiled for ``target``; float32 arguments."""
    sharding = _single_device(target)
    compiled = jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding) for s in shapes)).compile()
    t = hlo.hbm_traffic(compiled.as_text())
    assert t.uncounted_loops == []
    return t.bytes, compiled.cost_analysis()["bytes accessed"]


@pytest.mark.parametrize("target, fn, shapes, low, high", [
    # CPU: every op reads its operands and writes its result once in XLA's cost model too (measured ratio 1.000) ...
    pytest.param("cpu", lambda a, b: jnp.tanh(a @ b) @ b.T, ((256, 512), (512, 128)), 0.99, 1.01, id="cpu-matmuls"),
    # ... a fused dynamic-update-slice writes its update into (a copy of) the buffer, a dynamic-slice reads its rows
    pytest.param("cpu", lambda b, u: jax.lax.dynamic_update_slice(b, jnp.tanh(u), (jnp.argmax(u[:, 0]), 0)),
                 ((1024, 256), (16, 256)), 0.99, 1.01, id="cpu-update-slice"),
    pytest.param("cpu", lambda b, u: jax.lax.dynamic_slice(b, (jnp.argmax(u[:, 0]), 0), (16, 256)) * u,
                 ((1024, 256), (16, 256)), 0.99, 1.01, id="cpu-dynamic-slice"),
    # TPU, no matmul, every buffer in HBM (64 MiB each, too large for VMEM): the same figure (measured 1.000)
    pytest.param("tpu", lambda a: jax.nn.softmax(jnp.tanh(a) * 2, axis=-1), ((4096, 4096),), 0.99, 1.01,
                 id="tpu-softmax"),
    # TPU, matmuls: the TPU cost model also counts the operand tiles a tiled matmul re-reads and the reads of
    # buffers the compiler placed in VMEM (S(1)), which move no HBM bytes (measured 0.47; a 2048 x 2048 softmax,
    # whose input the compiler prefetches to VMEM, measures 0.375)
    pytest.param("tpu", lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2, ((512, 256), (256, 1024), (1024, 256)), 0.3, 0.7,
                 id="tpu-mlp"),
])
def test_hbm_traffic_of_a_loop_free_program_matches_xla_cost_analysis(target, fn, shapes, low, high):
    ours, xla = _hbm_vs_xla(fn, target, *shapes)
    assert low < ours / xla < high, (ours, xla, ours / xla)


@pytest.mark.parametrize("target", ["cpu", "tpu"])
def test_hbm_traffic_counts_each_scan_iteration(target):
    """A scan of n steps over a [1024, 128] float32 carry: our bytes grow by a body's traffic per step (the carry read
    and written at least once, a [128, 128] weight slice read), XLA's cost analysis counts the body once."""
    def scanned(c0, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), c0, ws)[0]

    (ours2, xla2), (ours8, xla8) = (_hbm_vs_xla(scanned, target, (1024, 128), (n, 128, 128)) for n in (2, 8))
    carry, w = 1024 * 128 * 4, 128 * 128 * 4
    per_step = (ours8 - ours2) / 6
    assert 2 * carry + w <= per_step <= 6 * carry, per_step / carry  # measured 4.375 (CPU), 4.125 (TPU)
    assert ours8 / ours2 > 3  # ~ 8 / 2: the body dominates
    assert xla8 - xla2 < per_step  # XLA: only the traffic outside the loop that grows with the stacked input


@pytest.mark.heavy
def test_grouped_matmul_input_gradient_compiles_for_v6e_at_mixtral_w2_shape():
    """The TPU grouped matmul's backward pass for Mixtral's w2 ([14336, 4096] per expert) on one v6e chip.
    ``jax.lax.ragged_dot``'s own input gradient exceeds scoped VMEM in libtpu 0.0.52's tiler
    (``CompileTimeScopedVmemOom``); ``tpu_grouped_matmul`` takes it against an explicit transpose."""
    from jax.sharding import SingleDeviceSharding

    from mistral_jax.model.kernels import tpu_grouped_matmul

    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    sh = SingleDeviceSharding(aot.topology_devices(aot.parse_topology("v6e-4"))[0])
    s = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    loss = lambda h, w, gs: jnp.sum(tpu_grouped_matmul(h, w, gs).astype(jnp.float32) ** 2)
    with jax.default_matmul_precision("default"):  # the TPU kernel's precision (conftest sets float32)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
            s((2048, 14336)), s((1, 14336, 4096)), s((1,), jnp.int32)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0


# ------------------------------------------------------------------------- the README's per-chip figures, pinned
# GiB per chip (arguments + temporaries) of real presets, as the README's AOT tables give them, per jax / libtpu
# (the XLA TPU compiler's choices move with libtpu). Rows of scripts/aot_table.py whose compile takes about a
# minute on 2 CPU cores.
README_GIB = {
    ("0.10.2", "0.0.42.1"): {"mistral_7b_v5p8": 51.67, "mixtral_8x7b": 26.08},
    ("0.12.0.1", "0.0.52"): {"mistral_7b_v5p8": 41.05, "mixtral_8x7b": 18.88},
}


@pytest.mark.parametrize("row", ["mistral_7b_v5p8", "mixtral_8x7b"])
@pytest.mark.slow
def test_real_preset_memory_per_chip_is_the_readmes(row):
    """``python -m mistral_jax.aot`` for Mistral 7B on a v5p-8 and Mixtral 8x7B on a v5p-128 (the README's rows,
    run as scripts/aot_table.py runs them) gives the README's GiB per chip to 1%."""
    import importlib.metadata
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("aot_table", os.path.join(root, "scripts", "aot_table.py"))
    aot_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot_table)
    versions = (jax.__version__, importlib.metadata.version("libtpu"))
    assert versions in README_GIB, (
        f"no README figures for jax {versions[0]} / libtpu {versions[1]} (known: {sorted(README_GIB)}). Fix: run "
        f"python scripts/aot_table.py --rows {','.join(README_GIB[min(README_GIB)])} with these versions, put the "
        "figures in the README's AOT table and in README_GIB here.")
    (name, config, topology, overrides, _), = [r for r in aot_table.ROWS if r[0] == row]
    report, _ = aot_table.run(sys.executable, config, topology, overrides)
    assert report["fits"]
    np.testing.assert_allclose(report["total"] / aot_table.GiB, README_GIB[versions][row], rtol=0.01)
