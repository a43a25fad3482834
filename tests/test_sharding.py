"""Meshes, logical sharding rules, sharded train step == single device, expert parallelism, remat policies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

import mistral_jax as mj
from configs import base
from mistral_jax import sharding as sh
from mistral_jax.model import backends
from mistral_jax.model import moe as moe_lib
from mistral_jax.training import step as step_lib
from mistral_jax.training.loss import loss_fn

B, T = 8, 16
MESHES = {  # preset -> mesh sizes on the 8 fake CPU devices
    "fsdp": dict(fsdp=8),
    "fsdp_tp": dict(fsdp=4, tensor=2),
    "fsdp_tp_ep": dict(fsdp=2, tensor=2, expert=2),
}


def run_config():
    c = base.get_config()
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.optimizer.learning_rate = 1e-3
    return c


def make_batch(cfg, seed=1):
    tok = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, cfg.vocab_size)
    seg = jnp.ones((B, T), jnp.int32).at[:, T // 2:].set(2)  # two packed documents per row
    pos = jnp.where(seg == 1, jnp.arange(T), jnp.arange(T) - T // 2).astype(jnp.int32)
    return dict(tokens=tok[:, :-1], targets=tok[:, 1:], weights=jnp.ones((B, T), jnp.float32).at[0, :3].set(0.0),
                positions=pos, segment_ids=seg)


def grads_and_loss(graphdef, params, batch, param_shardings=None, mesh=None, rules=None):
    fn = jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0])
    if mesh is None:
        return jax.jit(fn)(params, batch)
    bs = sh.batch_sharding(mesh, rules)
    with sh.use_mesh(mesh, rules):
        return jax.jit(fn, in_shardings=(param_shardings, {k: bs for k in batch}),
                       out_shardings=(sh.replicated(mesh), param_shardings))(params, batch)


@pytest.fixture(scope="module")
def reference():
    """Single device, dense MoE oracle: loss, grads and two train-step losses."""
    cfg = mj.ModelConfig.tiny_mixtral(moe_impl="dense")
    mesh = sh.make_mesh(fsdp=1, devices=jax.devices()[:1])
    rc = run_config()
    graphdef, state, shardings = step_lib.make_train_state(cfg, rc, mesh)
    batch = make_batch(cfg)
    loss, grads = grads_and_loss(graphdef, state["params"], batch)
    params0 = jax.tree.map(np.asarray, state["params"])
    tx, sched = mj_opt(rc)
    step = step_lib.jit_train_step(graphdef, tx, shardings, mesh, schedule=sched)
    losses = []
    with sh.use_mesh(mesh):
        for _ in range(2):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return dict(params0=params0, loss=float(loss), grads=jax.tree.map(np.asarray, grads), losses=losses,
                params2=jax.tree.map(np.asarray, state["params"]), batch=batch)


def mj_opt(rc):
    from mistral_jax.training.optimizer import make_optimizer

    return make_optimizer(rc.optimizer, int(rc.num_steps))


@pytest.fixture(scope="module", params=list(MESHES))
def sharded(request):
    preset = request.param
    cfg = mj.ModelConfig.tiny_mixtral()  # ragged; the EP mesh switches the MoE block to expert parallel
    mesh = sh.make_mesh(**MESHES[preset])
    rules = sh.rules_preset(preset)
    rc = run_config()
    graphdef, state, shardings = step_lib.make_train_state(cfg, rc, mesh, rules)
    return dict(preset=preset, cfg=cfg, mesh=mesh, rules=rules, rc=rc, graphdef=graphdef, state=state,
                shardings=shardings)


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_sharded_init_equals_single_device(reference, sharded):
    got = _flat(sharded["state"]["params"])
    for k, v in _flat(reference["params0"]).items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


@pytest.mark.slow
def test_sharded_loss_and_grads_match_single_device(reference, sharded):
    s = sharded
    loss, grads = grads_and_loss(s["graphdef"], s["state"]["params"], reference["batch"], s["shardings"]["params"],
                                 s["mesh"], s["rules"])
    np.testing.assert_allclose(float(loss), reference["loss"], rtol=1e-5, atol=1e-5)
    got = _flat(grads)
    for k, ref in _flat(reference["grads"]).items():
        np.testing.assert_allclose(np.asarray(got[k]), ref, atol=1e-5, rtol=1e-5, err_msg=f"{s['preset']} {k}")
    # Gradients come back with the parameters' shardings.
    for k, g in got.items():
        assert g.sharding.spec == _flat(s["shardings"]["params"])[k].spec, k


@pytest.mark.slow
def test_sharded_train_steps_match_single_device(reference):
    """The real jitted train step (AdamW, clipping, donation), two steps, on the FSDP+TP+EP mesh (compiling the
    full step is the slow part on CPU; the loss/grad test above covers every preset)."""
    cfg, preset = mj.ModelConfig.tiny_mixtral(), "fsdp_tp_ep"
    mesh, rules, rc = sh.make_mesh(**MESHES[preset]), sh.rules_preset(preset), run_config()
    graphdef, state, shardings = step_lib.make_train_state(cfg, rc, mesh, rules)
    tx, sched = mj_opt(rc)
    step = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, schedule=sched)
    losses = []
    with sh.use_mesh(mesh, rules):
        for _ in range(2):
            state, metrics = step(state, reference["batch"])
            losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference["losses"], rtol=1e-5, atol=1e-5)
    got = _flat(state["params"])
    for k, ref in _flat(reference["params2"]).items():
        np.testing.assert_allclose(np.asarray(got[k]), ref, atol=1e-5, err_msg=f"{preset} {k}")
        assert got[k].sharding.spec == _flat(shardings["params"])[k].spec, k


@pytest.mark.slow
def test_param_and_opt_state_shardings_are_the_rules(sharded):
    s = sharded
    mesh, rules = s["mesh"], s["rules"]
    abstract = nnx.state(nnx.eval_shape(lambda: mj.Transformer(s["cfg"], rngs=nnx.Rngs(0))))
    expected = {}
    for path, var in nnx.to_flat_state(abstract):
        expected[path] = rules.spec(sh.logical_axes_of(var), mesh)
    params = s["state"]["params"]
    for path, spec in expected.items():
        arr = params
        for p in path:
            arr = arr[p]
        assert arr.sharding.spec == spec, (path, arr.sharding.spec, spec)
        # Really sharded: every device holds 1/(product of its axes) of the array.
        n = np.prod([mesh.shape[a] for ax in spec if ax for a in ((ax,) if isinstance(ax, str) else ax)])
        assert arr.addressable_shards[0].data.size * n == arr.size, path
    # Adam moments carry their parameter's sharding; counters are replicated.
    adam = [x for x in jax.tree.leaves(s["state"]["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(x, "mu")]
    assert adam, "no Adam state found"
    for moment in (adam[0].mu, adam[0].nu):
        for k, v in _flat(moment).items():
            assert v.sharding.spec == _flat(params)[k].sharding.spec, k
    assert adam[0].count.sharding.spec == P()
    # Spot-check the meaning of the presets on the expert weights [L, E, D, F].
    w1 = params["layers"]["feed_forward"]["w1"].sharding.spec
    assert w1 == {"fsdp": P(None, None, "fsdp", None), "fsdp_tp": P(None, None, "fsdp", "tensor"),
                  "fsdp_tp_ep": P(None, "expert", "fsdp", "tensor")}[s["preset"]]


@pytest.mark.slow
def test_expert_parallel_block_equals_dense_oracle():
    """The MoE block alone, with and without tokens split over the expert axis, forward and backward."""
    cfg = mj.ModelConfig.tiny_mixtral(moe_impl="expert_parallel", num_experts=8)
    block = moe_lib.MoE(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (B, T, cfg.dim))
    graphdef, params = nnx.split(block)

    def f(p, x, graphdef=graphdef):
        y, stats = nnx.merge(graphdef, p)(x)
        return jnp.sum(jnp.sin(y)), y

    dense = nnx.graphdef(moe_lib.MoE(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(3)))
    (ref_l, ref_y), ref_g = jax.value_and_grad(
        lambda p, x: (lambda y: (jnp.sum(jnp.sin(y)), y))(nnx.merge(dense, p)(x)[0]), has_aux=True)(params, x)
    # No mesh: expert_parallel computes the ragged path.
    (l0, y0), _ = jax.value_and_grad(f, has_aux=True)(params, x)
    np.testing.assert_allclose(y0, ref_y, atol=1e-5)
    tok_split = sh.ShardingRules(sh.RULE_PRESETS["fsdp_tp_ep"])
    tok_repl = sh.ShardingRules({**sh.RULE_PRESETS["fsdp_tp_ep"], "batch": ("data", "fsdp")})
    for rules, mesh in ((tok_split, sh.make_mesh(fsdp=1, tensor=2, expert=4)),
                        (tok_repl, sh.make_mesh(fsdp=2, tensor=1, expert=4))):
        assert sh.expert_parallel(mesh, rules).tokens_split_over_experts == (rules is tok_split)
        on_mesh = nnx.graphdef(backends.bind(block, mesh, rules))  # the mesh passed to the model explicitly
        with sh.use_mesh(mesh, rules):
            fn = jax.jit(jax.value_and_grad(functools.partial(f, graphdef=on_mesh), has_aux=True))
            (loss, y), g = fn(params, x)
            assert "all-gather" in fn.lower(params, x).compile().as_text() or rules is tok_repl
        np.testing.assert_allclose(y, ref_y, atol=1e-5)
        np.testing.assert_allclose(float(loss), float(ref_l), rtol=1e-5)
        for k, v in _flat(ref_g).items():
            np.testing.assert_allclose(np.asarray(_flat(g)[k]), np.asarray(v), atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_expert_parallel_rejects_indivisible_experts():
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=3, num_experts_per_tok=2)
    block = moe_lib.MoE(cfg, rngs=nnx.Rngs(0))
    x = jnp.ones((B, T, cfg.dim))
    mesh, rules = sh.make_mesh(fsdp=4, expert=2), sh.rules_preset("fsdp_tp_ep")
    backends.bind(block, mesh, rules)
    with sh.use_mesh(mesh, rules):
        with pytest.raises(ValueError, match="3 experts cannot be split over the expert mesh axis of size 2"):
            jax.eval_shape(block, x)


# ------------------------------------------------------------------------------------------------ rules and meshes
def test_rules_raise_when_a_mesh_axis_is_used_twice():
    rules = sh.ShardingRules({**sh.RULE_PRESETS["fsdp_tp"], "head_dim": "tensor"})
    mesh = sh.make_mesh(fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="mesh axis 'tensor' shards both 'heads' and 'head_dim'"):
        rules.spec(("embed", "heads", "head_dim"), mesh)
    with pytest.raises(ValueError, match="no sharding rule"):
        rules.spec(("embedd",), mesh)


def test_yield_to_gives_other_dimensions_only_the_free_mesh_axes():
    mesh = sh.make_mesh(data=2, fsdp=2, expert=2)
    rules = sh.DEFAULT_RULES  # batch: data x fsdp x expert, embed: fsdp x expert
    assert rules.spec(("batch", None, "embed"), mesh, yield_to=("embed",)) == P("data", None, ("fsdp", "expert"))
    assert rules.spec(("batch", None), mesh, yield_to=("embed",)) == P("data", None)  # reserved even if absent
    assert rules.spec(("batch", None), mesh) == P(("data", "fsdp", "expert"), None)
    one_slice = sh.make_mesh(fsdp=4, expert=2)  # no free batch axis: the batch is replicated
    assert rules.spec(("batch", None, "embed"), one_slice, yield_to=("embed",)) == P(None, None, ("fsdp", "expert"))
    with pytest.raises(ValueError, match="shards both"):  # without it, the same spec is a conflict
        rules.spec(("batch", None, "embed"), mesh)


def test_size_one_axes_are_dropped_and_presets_differ():
    mesh = sh.make_mesh(fsdp=8)
    assert sh.rules_preset("fsdp_tp_ep").spec(("experts", "expert_embed", "mlp"), mesh) == P(None, "fsdp", None)
    mesh = sh.make_mesh(fsdp=2, tensor=2, expert=2)
    assert sh.rules_preset("fsdp").spec(("batch", "seq"), mesh) == P(("fsdp", "tensor", "expert"), None)
    assert sh.rules_preset("fsdp_tp").spec(("batch", "seq"), mesh) == P(("fsdp", "expert"), None)
    # Experts follow the expert axis in every preset: mesh.expert > 1 never means E-fold replicated experts.
    assert sh.rules_preset("fsdp_tp").spec(("experts", "expert_embed", "mlp"), mesh) == P("expert", "fsdp", "tensor")
    # Non-expert weights are sharded over every batch axis that is not tensor-parallel (fsdp and expert), so none is
    # replicated over the expert groups; with the fsdp preset `tensor` is one more such axis.
    assert sh.rules_preset("fsdp_tp").spec(("vocab", "embed"), mesh) == P("tensor", ("fsdp", "expert"))
    assert sh.rules_preset("fsdp").spec(("embed", "mlp"), mesh) == P(("fsdp", "tensor", "expert"), None)
    assert sh.rules_preset("fsdp").spec(("experts", "expert_embed", "mlp"), mesh) == P("expert", ("fsdp", "tensor"),
                                                                                         None)
    with pytest.raises(ValueError, match="unknown sharding preset 'tp'"):
        sh.rules_preset("tp")


def test_mesh_from_config_fills_and_validates():
    mesh = sh.mesh_from_config(ConfigDict(dict(data=2, fsdp=-1, tensor=2, expert=1)))
    assert dict(mesh.shape) == dict(data=2, fsdp=2, context=1, tensor=2, expert=1)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sh.mesh_from_config({}).shape)["fsdp"] == 8
    with pytest.raises(ValueError, match="not divisible by 3"):
        sh.mesh_from_config(dict(tensor=3))
    with pytest.raises(ValueError, match="only one axis may be -1"):
        sh.mesh_from_config(dict(data=-1, fsdp=-1))
    assert sh.rules_from_config(dict(rules="auto"), sh.make_mesh(fsdp=4, expert=2)).rules == sh.RULE_PRESETS[
        "fsdp_tp_ep"]
    assert sh.rules_from_config(dict(rules="auto"), sh.make_mesh(fsdp=4, tensor=2)).rules == sh.RULE_PRESETS["fsdp_tp"]
    assert sh.rules_from_config(dict(rules="fsdp"), sh.make_mesh(fsdp=4, tensor=2)).rules == sh.RULE_PRESETS["fsdp"]


def test_create_sharded_rejects_indivisible_dims():
    cfg = mj.ModelConfig.tiny(dim=60, n_heads=4, head_dim=16)  # embed 60 over fsdp=8
    with pytest.raises(ValueError, match="60 % 8 != 0"):
        sh.create_sharded(lambda: mj.Transformer(cfg, rngs=nnx.Rngs(0)), sh.make_mesh(fsdp=8))


def test_constrain_is_identity_without_mesh_and_shards_with_one():
    x = jnp.ones((B, T, 64))
    assert sh.constrain(x, ("batch", "seq", "act_embed")) is x
    mesh = sh.make_mesh(fsdp=4, tensor=2)
    with sh.use_mesh(mesh, sh.rules_preset("fsdp_tp")):
        y = jax.jit(lambda a: sh.constrain(a * 2, ("batch", "seq", "act_mlp")))(x)
    assert y.sharding.spec == P("fsdp", None, "tensor")


# ------------------------------------------------------------------------------------------------ remat policies
@pytest.mark.slow
def test_remat_policies_same_loss_and_grads_different_programs():
    cfg0 = mj.ModelConfig.tiny(n_layers=3)
    batch = make_batch(cfg0, seed=7)
    params = nnx.state(mj.Transformer(cfg0, rngs=nnx.Rngs(0)))
    results = {}
    for policy in ("none", "full", "save_dots", "save_qkv_proj", "save_dots_no_batch"):
        graphdef = nnx.graphdef(mj.Transformer(cfg0.replace(remat=policy), rngs=nnx.Rngs(0)))
        fn = jax.jit(jax.value_and_grad(lambda p, b, g=graphdef: loss_fn(nnx.merge(g, p), b)[0]))
        compiled = fn.lower(params, batch).compile()
        loss, grads = compiled(params, batch)
        mem = compiled.memory_analysis()
        results[policy] = (float(loss), grads, mem.temp_size_in_bytes, compiled.cost_analysis()["flops"])
    ref_loss, ref_grads, none_temp, none_flops = results["none"]
    for policy, (loss, grads, temp, flops) in results.items():
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for k, v in _flat(ref_grads).items():
            np.testing.assert_allclose(np.asarray(_flat(grads)[k]), np.asarray(v), atol=1e-6, err_msg=f"{policy} {k}")
        if policy != "none":  # recomputing in the backward pass: fewer saved activations, more FLOPs
            assert temp < none_temp, (policy, temp, none_temp)
            assert flops > none_flops, (policy, flops, none_flops)
    # Saving the matmul outputs recomputes less than full remat.
    assert results["save_dots"][3] < results["full"][3]
    assert results["full"][2] <= min(r[2] for r in results.values())
