"""Multi-slice TPU meshes: DCN axes (mesh.dcn_data, mesh.dcn_fsdp) over slices, ICI axes inside each slice.

The multi-slice devices are libtpu's compile-only devices for two v5p-8 slices (``topology_devices(..., 2)``):
each carries its ``slice_index`` as on a real multi-slice job, and the train step compiles for them (AOT).
"""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mistral_jax as mj
from configs import tiny
from mistral_jax import aot
from mistral_jax import sharding as sh
from mistral_jax.aot import hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_slices():
    """8 compile-only TPU devices: 2 slices of v5p-8 (4 chips each)."""
    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    devices = aot.topology_devices(aot.parse_topology("v5p-8"), num_slices=2)
    assert len(devices) == 8 and sh.num_slices(devices) == 2
    return devices


# ------------------------------------------------------------------------------------------ one slice: as before
def test_dcn_axes_of_one_keep_the_single_slice_mesh():
    # CPU devices carry no slice_index: dcn axes of 1 build exactly the mesh make_mesh built before they existed.
    assert sh.num_slices(jax.devices()) == 1 and sh.slice_groups(jax.devices()) is None
    for sizes in (dict(fsdp=-1), dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, expert=2)):
        plain = sh.make_mesh(**sizes)
        from_cfg = sh.mesh_from_config({**sizes, "dcn_data": 1, "dcn_fsdp": 1})
        assert from_cfg.shape == plain.shape and from_cfg.axis_names == sh.MESH_AXES
        assert (from_cfg.devices == plain.devices).all()
    assert sh.mesh_from_config(tiny.get_config().mesh).shape == sh.make_mesh().shape  # base config: dcn = 1


@pytest.mark.parametrize("mesh_cfg, match", [
    ({"dcn_data": 2}, r"^mesh.dcn_data=2, mesh.dcn_fsdp=1 spread the mesh over 2 TPU slices, but the 8 devices have "
                      r"no slice_index .* Fix: set mesh.dcn_data=1 and mesh.dcn_fsdp=1 on one slice"),
    ({"dcn_fsdp": 2}, r"mesh.dcn_fsdp=2 spread the mesh over 2 TPU slices.*Fix:"),
    ({"dcn_data": 0}, r"^mesh.dcn_data=0 must be a positive integer .*Fix: set mesh.dcn_data=1"),
    ({"dcn_fsdp": -1}, r"^mesh.dcn_fsdp=-1 must be a positive integer"),
])
def test_dcn_axes_without_slices_fail_in_one_line(mesh_cfg, match):
    with pytest.raises(ValueError, match=match) as e:
        sh.mesh_from_config(mesh_cfg)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ two slices
def test_data_axis_spans_slices_and_the_other_axes_stay_inside_one(two_slices):
    mesh = sh.mesh_from_config({"fsdp": -1, "expert": 2, "dcn_data": 2}, devices=two_slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 1, "expert": 2}
    for i in range(2):  # data index i is slice i: its devices form the whole (fsdp, tensor, expert) sub-mesh
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
        assert len(set(mesh.devices[i].flat)) == 4

    # dcn_fsdp: the fsdp axis is (slice, ici fsdp), slice-major; data stays inside a slice.
    mesh = sh.mesh_from_config({"fsdp": 2, "data": 2, "dcn_fsdp": 2}, devices=two_slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1, "expert": 1}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices[:, :, 0, 0, 0])
    assert (slices == np.array([[0, 0, 1, 1]] * 2)).all()


def test_parameters_replicate_across_slices_and_shard_inside_one(two_slices):
    # One logical-axis rules table: params shard over fsdp / tensor / expert (inside a slice), the batch over
    # data x fsdp x expert (across slices too).
    mesh = sh.mesh_from_config({"fsdp": 2, "tensor": 2, "dcn_data": 2}, devices=two_slices)
    rules = sh.rules_from_config({}, mesh)
    assert rules.spec(("batch", "seq"), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    model = nnx.eval_shape(lambda: mj.Transformer(mj.ModelConfig.tiny(), rngs=nnx.Rngs(0)))
    shardings = sh.state_shardings(nnx.state(model), mesh, rules)
    for var, s in zip(jax.tree.leaves(nnx.state(model), is_leaf=sh._is_var),
                      jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)), strict=True):
        assert "data" not in jax.tree.leaves(tuple(s.spec))
        holders = {}  # shard index -> the devices holding it
        for d, idx in s.devices_indices_map(tuple(var.shape)).items():
            holders.setdefault(str(idx), []).append(d.slice_index)
        # every shard lives in both slices, as often in each: a slice holds the whole parameter (sharded or
        # replicated inside it), the slices are replicas of each other
        assert all(v.count(0) == v.count(1) >= 1 for v in holders.values()), (s.spec, holders)


@pytest.mark.parametrize("mesh_cfg, match", [
    ({"dcn_data": 4}, r"^mesh.dcn_data=4, mesh.dcn_fsdp=1 multiply to 4 slices, but the devices span 2 slices\. "
                      r"Fix: make mesh.dcn_data x mesh.dcn_fsdp equal 2"),
    ({"dcn_data": 2, "dcn_fsdp": 2}, r"multiply to 4 slices, but the devices span 2 slices"),
    ({}, r"^the 8 devices span 2 TPU slices but mesh.dcn_data=1 and mesh.dcn_fsdp=1 \(one slice\)\. "
         r"Fix: set --config.mesh.dcn_data=2"),
    ({"dcn_data": 2, "fsdp": 8}, r"multiply to 8 but there are 4 devices per slice"),
])
def test_dcn_axes_that_do_not_match_the_slices_fail_in_one_line(two_slices, mesh_cfg, match):
    with pytest.raises(ValueError, match=match) as e:
        sh.mesh_from_config(mesh_cfg, devices=two_slices)
    assert "\n" not in str(e.value)


def test_embedding_backward_keeps_each_slice_on_its_own_batch(two_slices):
    """The embedding lookup's backward over 2 slices (batch over data x fsdp x expert, the table's D over fsdp x
    expert): each device exchanges only its own batch shard's hidden gradient within its slice (an all-to-all).
    With the tokens replicated over `data` for the lookup, the partitioner all-gathered the whole batch's
    [B, T, D] gradient on every device instead (3 x 8 GiB per chip for Mixtral on 2 x v5p-128)."""
    mesh = sh.mesh_from_config({"fsdp": 2, "expert": 2, "dcn_data": 2}, devices=two_slices)
    cfg = mj.ModelConfig.tiny(dim=256, vocab_size=512)
    B, T, D = 16, 128, cfg.dim

    def loss(table, tokens, g):
        x = mj.Transformer.embed_tokens(types.SimpleNamespace(embed=table, cfg=cfg), tokens)
        return jnp.sum(x.astype(jnp.float32) * g)

    batch = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    args = (jax.ShapeDtypeStruct((cfg.vocab_size, D), jnp.float32,
                                 sharding=NamedSharding(mesh, P(None, ("fsdp", "expert")))),
            jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch),
            jax.ShapeDtypeStruct((B, T, D), jnp.float32, sharding=batch))
    with sh.use_mesh(mesh):
        compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
    traffic = hlo.collective_traffic(compiled.as_text())
    one_device_share = B * T * D * 4 / 8  # float32 hidden gradient of one device's batch shard
    assert traffic.kinds["all-to-all"]["count"] >= 1, hlo.describe(traffic)
    assert 0 < traffic.bytes < one_device_share, hlo.describe(traffic)


@pytest.mark.slow
def test_aot_compiles_tiny_mixtral_for_two_slices(two_slices):
    cfg = tiny.get_config()
    cfg.model.preset = "tiny_mixtral"
    cfg.data.seq_len = 128
    cfg.mesh.fsdp, cfg.mesh.expert = -1, 2  # the config sets no DCN axis: --num_slices gives dcn_data = 2
    r = aot.compile_train_step(cfg, two_slices)
    assert r["slices"] == 2 and r["devices"] == 8 and r["dcn"] == {"dcn_data": 2, "dcn_fsdp": 1}
    assert r["mesh"] == {"data": 2, "fsdp": 2, "context": 1, "tensor": 1, "expert": 2}
    topo = aot.parse_topology("v5p-8")
    assert 0 < r["total"] < topo.hbm_bytes
    text = aot.format_report({**r, "hbm": topo.hbm_bytes, "fits": True}, "tiny")
    assert "8 chips, 2 slices" in text and "FITS" in text


@pytest.mark.slow
def test_aot_cli_num_slices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "mistral_jax.aot", "--config", "configs/tiny.py", "--topology", "v5p-8",
           "--config.data.seq_len=32", "--config.batch_size=8"]
    bad = subprocess.run(cmd + ["--num_slices", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--num_slices=0 must be at least 1" in bad.stderr, bad.stderr
    ok = subprocess.run(cmd + ["--num_slices", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert not ok.stderr.strip(), ok.stderr[-3000:]  # quiet: libtpu's start-up lines on a host without TPUs are held
    assert "v5p-8 x 2 slices" in ok.stdout and "8 chips, 2 slices" in ok.stdout and "FITS" in ok.stdout, ok.stdout
    assert "'data': 2" in ok.stdout


def test_mesh_shape_checks_a_config_without_devices(two_slices):
    # The device-free sizes (for validating a run config before building anything) are the built mesh's.
    for cfg in ({"fsdp": -1, "expert": 2, "dcn_data": 2}, {"data": 2, "fsdp": 2, "dcn_fsdp": 2},
                {"fsdp": 2, "tensor": 2, "dcn_data": 2}):
        assert sh.mesh_shape(cfg, 8, 2) == dict(sh.mesh_from_config(cfg, devices=two_slices).shape)
    for cfg in ({}, {"data": 2, "tensor": 2, "expert": 2}, {"fsdp": -1, "dcn_fsdp": 1}):
        assert sh.mesh_shape(cfg, 8) == dict(sh.mesh_from_config(cfg).shape)  # one slice: as before
    for cfg, n_slices, match in (({}, 2, "span 2 TPU slices but mesh.dcn_data=1"),
                                 ({"dcn_data": 2}, 1, "spread the mesh over 2 TPU slices, but the 8 devices are one"),
                                 ({"dcn_data": 4}, 2, "multiply to 4 slices, but the devices span 2"),
                                 ({"dcn_data": 2, "fsdp": 8}, 2, "multiply to 8 but there are 4 devices per slice")):
        with pytest.raises(ValueError, match=match):
            sh.mesh_shape(cfg, 8, n_slices)


def test_aot_rejects_what_train_py_rejects_before_compiling(two_slices):
    cfg = tiny.get_config()
    cfg.batch_size, cfg.grad_accum_steps = 8, 2  # 4-row micro-batches on data 2 x fsdp 4 = 8
    with pytest.raises(aot.MeshConfigError, match=r"^config.batch_size=8 with grad_accum_steps=2 gives micro-batches "
                                                  r"of 4 rows, which do not split over the data-parallel size 8 = "
                                                  r"data 2 x fsdp 4\. Fix: set --config.grad_accum_steps=1"):
        aot.compile_train_step(cfg, two_slices)
    cfg.grad_accum_steps, cfg.mesh.dcn_data = 1, 4
    with pytest.raises(aot.MeshConfigError, match=r"^config.mesh on 8 chips \(2 slice\(s\)\): mesh.dcn_data=4"):
        aot.compile_train_step(cfg, two_slices)


def test_layout_fallback_keeps_each_slice_one_block(two_slices, monkeypatch):
    # Where the physical layout cannot take a shape, each slice is reshaped on its own: the same slice blocks.
    want = sh.mesh_from_config({"fsdp": 2, "expert": 2, "dcn_data": 2}, devices=two_slices)

    def refuse(*args, **kwargs):
        raise ValueError("no physical layout")

    monkeypatch.setattr(mesh_utils, "create_hybrid_device_mesh", refuse)
    got = sh.mesh_from_config({"fsdp": 2, "expert": 2, "dcn_data": 2}, devices=two_slices)
    assert got.shape == want.shape
    for i in range(2):
        assert {d.slice_index for d in got.devices[i].flat} == {i}
    got = sh.mesh_from_config({"fsdp": 2, "data": 2, "dcn_fsdp": 2}, devices=two_slices)
    slices = np.vectorize(lambda d: d.slice_index)(got.devices[:, :, 0, 0, 0])
    assert (slices == np.array([[0, 0, 1, 1]] * 2)).all()
