"""ModelConfig: presets, parameter counts, validation, HF round trip, and one test per field that it is read."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.model.transformer import from_params, params_dict
from mistral_jax.training.loss import loss_fn

# ----------------------------------------------------------------------------- counts (Mistral paper numbers)


def test_parameter_counts_match_the_paper():
    assert mj.count_params(mj.ModelConfig.mistral_7b_v01()) == 7_241_732_096
    assert mj.count_params(mj.ModelConfig.mixtral_8x7b()) == 46_702_792_704
    assert mj.count_active_params(mj.ModelConfig.mixtral_8x7b()) == 12_879_925_248
    assert mj.count_active_params(mj.ModelConfig.mistral_7b_v01()) == 7_241_732_096


def test_presets():
    v01, v02, mx = mj.ModelConfig.mistral_7b_v01(), mj.ModelConfig.mistral_7b_v02(), mj.ModelConfig.mixtral_8x7b()
    assert (v01.sliding_window, v01.rope_theta) == (4096, 1e4)
    assert (v02.sliding_window, v02.rope_theta, v02.max_seq_len) == (None, 1e6, 32768)
    assert (mx.num_experts, mx.num_experts_per_tok, mx.sliding_window, mx.rope_theta) == (8, 2, None, 1e6)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(n_heads=6, n_kv_heads=4), ["n_heads=6", "n_kv_heads=4"]),
        (dict(num_experts=4, num_experts_per_tok=5), ["num_experts_per_tok=5", "num_experts=4"]),
        (dict(sliding_window=0), ["sliding_window=0"]),
        (dict(sliding_window=-3), ["sliding_window=-3"]),
        (dict(head_dim=15), ["head_dim=15"]),
        (dict(dtype="float8"), ["dtype='float8'"]),
        (dict(vocab_size=0), ["vocab_size=0"]),
        (dict(attention_impl="flash"), ["attention_impl='flash'"]),
        (dict(moe_impl="sparse"), ["moe_impl='sparse'", "dense, ragged, expert_parallel"]),
        (dict(remat="most"), ["remat='most'"]),
        (dict(matmul_quant="int4"), ["matmul_quant='int4'", "none, int8, fp8"]),
    ],
)
def test_invalid_configs_raise_with_values_and_fix(changes, words):
    with pytest.raises(ValueError) as e:
        mj.ModelConfig.tiny(**changes)
    for w in words:
        assert w in str(e.value)
    assert "Fix:" in str(e.value)


def test_replace_rejects_unknown_field():
    with pytest.raises(ValueError, match="slidin_window"):
        mj.ModelConfig.tiny().replace(slidin_window=3)


@pytest.mark.parametrize("preset", ["mistral_7b_v01", "mistral_7b_v02", "mixtral_8x7b", "tiny", "tiny_mixtral"])
@pytest.mark.oracle
def test_hf_and_mistral_config_round_trip(preset):
    import transformers

    cfg = mj.ModelConfig.preset(preset)
    hf_cls = transformers.MixtralConfig if cfg.is_moe else transformers.MistralConfig
    hc = hf_cls(**cfg.to_hf())  # transformers accepts our dict ...
    back = mj.ModelConfig.from_hf(hc)  # ... and we read transformers' own object back
    keep = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in (
        "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "norm_eps", "rope_theta",
        "sliding_window", "max_seq_len", "num_experts", "num_experts_per_tok", "router_aux_loss_coef")}
    assert {k: getattr(back, k) for k in keep} == keep
    again = mj.ModelConfig.from_mistral_params(cfg.to_mistral_params())
    assert {k: getattr(again, k) for k in keep if k != "router_aux_loss_coef"} == {
        k: v for k, v in keep.items() if k != "router_aux_loss_coef"}


def test_from_hf_rejects_other_architectures():
    with pytest.raises(ValueError, match="model_type='llama'"):
        mj.ModelConfig.from_hf({"model_type": "llama"})


# ----------------------------------------------------------------------------- every field is read

T = 24
TOKENS = np.random.default_rng(0).integers(0, 512, (2, T)).astype(np.int32)


def _logits(cfg, params=None, seed=0):
    model = mj.Transformer(cfg, rngs=nnx.Rngs(seed)) if params is None else from_params(cfg, params)
    return np.asarray(model(TOKENS)), model


def _same_params_differ(base: mj.ModelConfig, **changes):
    """Same weights, one field flipped: the logits must change."""
    a, model = _logits(base)
    b, _ = _logits(base.replace(**changes), params_dict(model))
    assert a.shape == b.shape
    assert np.abs(a - b).max() > 1e-4, changes


def _same_output_other_program(base: mj.ModelConfig, fn=None, **changes):
    """Implementation fields: the compiled program changes, the numbers do not."""
    fn = fn or (lambda m, x: m(x))
    texts, outs = [], []
    for cfg in (base, base.replace(**changes)):
        model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        pure = lambda s, x, g=graphdef: fn(nnx.merge(g, s), x)
        texts.append(jax.jit(pure).lower(state, TOKENS).as_text())
        outs.append(jax.jit(pure)(state, TOKENS))
    assert texts[0] != texts[1], changes
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5), *outs)
    return texts


DENSE = mj.ModelConfig.tiny(sliding_window=6)
MOE = mj.ModelConfig.tiny_mixtral()


def _shape_field(field, value, base=DENSE):
    """Shape fields: the changed model is HF's model with that field changed (same count, same logits)."""
    def check():
        import torch

        from tests.torch_ref import hf_model

        cfg = base.replace(**{field: value}, initializer_range=0.2)
        assert mj.count_params(cfg) != mj.count_params(base)
        model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
        hf = hf_model(cfg, model)  # HF built from cfg.to_hf(): a field we ignored would not fit its shapes
        assert mj.count_params(cfg) == sum(p.numel() for p in hf.parameters())
        with torch.no_grad():
            ref = hf(torch.from_numpy(TOKENS % cfg.vocab_size).long()).logits.numpy()
        np.testing.assert_allclose(np.asarray(model(TOKENS % cfg.vocab_size)), ref, atol=1e-4, rtol=0)
    return check


def _loss_coef(field):
    def check():
        batch = dict(tokens=TOKENS, targets=np.roll(TOKENS, -1, 1), weights=np.ones(TOKENS.shape, np.float32))
        model = mj.Transformer(MOE.replace(**{field: 0.0}), rngs=nnx.Rngs(0))
        l0 = float(loss_fn(model, batch)[0])
        l1 = float(loss_fn(from_params(MOE.replace(**{field: 0.5}), params_dict(model)), batch)[0])
        assert abs(l1 - l0) > 1e-3
    return check


def _max_seq_len():
    nowin = DENSE.replace(sliding_window=None)
    assert mj.KVCache.init(nowin.replace(max_seq_len=64), 1).k.shape[2] == 64
    assert mj.KVCache.init(nowin.replace(max_seq_len=128), 1).k.shape[2] == 128


def _tie_embeddings():
    cfg = DENSE.replace(tie_embeddings=True)
    assert mj.count_params(DENSE) - mj.count_params(cfg) == DENSE.dim * DENSE.vocab_size
    logits, model = _logits(cfg)  # tied: logits = h @ embed^T, so a zero embedding row gives zero logits
    params = params_dict(model)
    params["embed"] = params["embed"].at[7].set(0.0)
    zeroed, _ = _logits(cfg, params)
    np.testing.assert_allclose(zeroed[..., 7], 0.0, atol=1e-6)
    assert np.abs(logits[..., 7]).max() > 1e-4


def _dtype():
    a, model = _logits(DENSE)
    b, _ = _logits(DENSE.replace(dtype="bfloat16"), params_dict(model))
    assert b.dtype == np.float32  # logits stay float32
    assert 1e-4 < np.abs(a - b).max() < 0.5


def _param_dtype():
    model = mj.Transformer(DENSE.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(params_dict(model))} == {jnp.dtype(jnp.bfloat16)}


def _initializer_range():
    std = lambda r: float(jnp.std(params_dict(mj.Transformer(DENSE.replace(initializer_range=r), rngs=nnx.Rngs(0)))[
        "layers"]["attention"]["wq"]))
    assert abs(std(0.02) - 0.02) < 2e-3 and abs(std(0.1) - 0.1) < 1e-2


def _remat():
    """Every policy rewrites the backward program; two of them are run and give the same gradients."""
    def grad_fn(m, x):
        return nnx.grad(lambda m: m(x).sum())(m)

    def lowered(policy):
        graphdef, state = nnx.split(mj.Transformer(DENSE.replace(remat=policy), rngs=nnx.Rngs(0)))
        return jax.jit(lambda s, x: grad_fn(nnx.merge(graphdef, s), x)).lower(state, TOKENS).as_text()

    texts = {p: lowered(p) for p in ("none", "full", "save_dots", "save_qkv_proj", "save_dots_no_batch", "offload")}
    assert len(set(texts.values())) == len(texts)
    _same_output_other_program(DENSE.replace(remat="none"), grad_fn, remat="save_qkv_proj")


def _moe_impl():
    _same_output_other_program(MOE.replace(moe_impl="dense"), moe_impl="ragged")
    jaxpr = lambda impl: str(jax.make_jaxpr(lambda x: mj.Transformer(MOE.replace(moe_impl=impl), rngs=nnx.Rngs(0))(x))(
        TOKENS))
    all_experts = f"f32[{TOKENS.size},{MOE.num_experts},{MOE.hidden_dim}]"  # [M, E, F]: every expert on every token
    assert all_experts in jaxpr("dense") and all_experts not in jaxpr("ragged")


def _loss_chunk_size():
    def loss_and_grads(m, x):
        batch = dict(tokens=x, targets=jnp.roll(x, -1, 1), weights=jnp.ones(x.shape, jnp.float32))
        return nnx.value_and_grad(lambda m: loss_fn(m, batch)[0])(m)

    _same_output_other_program(DENSE, loss_and_grads, loss_chunk_size=7)


def _expert_parallel_programs(**changes):
    """Expert-parallel fields: on an fsdp 2 x expert 4 mesh of the 8 CPU devices, the compiled program changes, the
    numbers do not."""
    from mistral_jax import sharding as sh

    tokens = np.random.default_rng(1).integers(0, 512, (8, T)).astype(np.int32)
    texts, outs = [], []
    mesh, rules = sh.make_mesh(fsdp=2, expert=4), sh.rules_preset("fsdp_tp_ep")
    with sh.use_mesh(mesh, rules):
        for cfg in (MOE, MOE.replace(**changes)):
            graphdef, state = nnx.split(mj.Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
            fn = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
            texts.append(fn.lower(state, tokens).compile().as_text())
            outs.append(fn(state, tokens))
    assert texts[0] != texts[1], changes
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), atol=2e-5)
    return texts


def _moe_dispatch():
    a2a, gather = _expert_parallel_programs(moe_dispatch="all_gather")
    # (both programs also move the token embeddings to batch sharding with one all-to-all)
    assert a2a.count(" all-to-all(") > gather.count(" all-to-all(")


def _moe_chunk_tokens():
    whole, chunked = _expert_parallel_programs(moe_chunk_tokens=4)  # 24 tokens per shard: 6 dispatches of 4
    assert chunked.count("all-to-all") > whole.count("all-to-all") or " while(" in chunked


def _platform():
    """Backends follow the target platform, not the host: this CPU host traces TPU programs for a "tpu" config."""
    from mistral_jax.model import backends

    assert mj.Transformer(DENSE, rngs=nnx.Rngs(0)).cfg.platform == jax.default_backend()  # "" = the host's
    pick = lambda p: backends.choose_attention("auto", platform=p, self_attention=True, seq_len=4096, window=512,
                                               block=128, has_segments=False)
    assert (pick("cpu"), pick("gpu"), pick("tpu")) == ("blocked", "cudnn", "splash")
    jaxpr = lambda cfg, t: str(jax.make_jaxpr(lambda x: mj.Transformer(cfg, rngs=nnx.Rngs(0))(x))(
        np.zeros((2, t), np.int32)))
    # the grouped matmul: ragged_dot (megablox on TPU) vs the looped block-sparse form on CPU
    moe = MOE.replace(attention_impl="reference")
    assert "ragged_dot" in jaxpr(moe.replace(platform="tpu"), T) and "ragged_dot" not in jaxpr(moe, T)
    # auto attention: the Pallas splash kernel for TPU (traced here, on a CPU host) vs pure JAX on CPU
    assert "pallas_call" in jaxpr(DENSE.replace(platform="tpu"), 256)
    assert "pallas_call" not in jaxpr(DENSE.replace(platform="cpu"), 256)


def _kv_cache_dtype():
    """int8 stores the decoding cache in int8 (the uncached forward does not change) and decodes close to float."""
    from mistral_jax.model.kv_cache import KVCache

    q = DENSE.replace(kv_cache_dtype="int8")
    assert KVCache.init(q, 1, 16).k.dtype == jnp.int8 and KVCache.init(DENSE, 1, 16).k.dtype == jnp.float32
    model = mj.Transformer(DENSE, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    q_model = nnx.merge(nnx.graphdef(mj.Transformer(q, rngs=nnx.Rngs(0))), state)
    tokens = np.asarray(TOKENS)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    outs = [m.forward(tokens, positions, cache=KVCache.init(m.cfg, tokens.shape[0], 64)).logits
            for m in (model, q_model)]
    err = float(jnp.max(jnp.abs(outs[0] - outs[1])))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(outs[0]))), err
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(q_model(tokens)))


def _matmul_operands(fn, *args) -> set[tuple[str, str, str]]:
    """``(primitive, lhs dtype, rhs dtype)`` of every dot_general / ragged_dot in ``fn``'s jaxpr, nested ones too."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "ragged_dot", "ragged_dot_general"):
                found.add((eqn.primitive.name, *(str(v.aval.dtype) for v in eqn.invars[:2])))
            for p in eqn.params.values():
                for sub in p if isinstance(p, list | tuple) else [p]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _matmul_quant():
    """int8 / fp8: the same weights give logits within a few percent of float, and the decoder layers' matmuls,
    the Mixtral experts' ragged_dot included, take int8 / float8 operands in the forward and backward programs."""
    def operands(m):
        graphdef, state = nnx.split(m)
        return _matmul_operands(jax.grad(lambda s, x: nnx.merge(graphdef, s)(x).sum()), state, TOKENS)

    for base, matmul in ((DENSE, "dot_general"), (MOE, "ragged_dot_general")):
        ref, model = _logits(base)
        assert {(p, a, b) for p, a, b in operands(model) if a != "float32" or b != "float32"} == set()
        for mode, fwd, bwd, tol in (("int8", "int8", "int8", 0.05), ("fp8", "float8_e4m3fn", "float8_e5m2", 0.15)):
            out, q_model = _logits(base.replace(matmul_quant=mode), params_dict(model))
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert 1e-4 < err < tol, (base.num_experts, mode, err)
            found = operands(q_model)
            assert (matmul, fwd, fwd) in found, (mode, found)  # forward: activations x weights
            assert any(bwd in (a, b) for _, a, b in found), (mode, found)  # backward: the incoming gradients
            assert ("dot_general", "float32", "float32") in found  # attention scores, router and head stay float

FIELD_CHECKS = {
    "vocab_size": _shape_field("vocab_size", 256),
    "dim": _shape_field("dim", 32),
    "n_layers": _shape_field("n_layers", 3),
    "n_heads": _shape_field("n_heads", 8),
    "n_kv_heads": _shape_field("n_kv_heads", 4),
    "head_dim": _shape_field("head_dim", 8),
    "hidden_dim": _shape_field("hidden_dim", 96),
    "norm_eps": lambda: _same_params_differ(DENSE, norm_eps=0.5),
    "rope_theta": lambda: _same_params_differ(DENSE, rope_theta=50.0),
    "sliding_window": lambda: _same_params_differ(DENSE, sliding_window=3),
    "max_seq_len": _max_seq_len,
    "tie_embeddings": _tie_embeddings,
    "num_experts": _shape_field("num_experts", 2, MOE),
    "num_experts_per_tok": lambda: _same_params_differ(MOE, num_experts_per_tok=1),
    "router_aux_loss_coef": _loss_coef("router_aux_loss_coef"),
    "router_z_loss_coef": _loss_coef("router_z_loss_coef"),
    "dtype": _dtype,
    "param_dtype": _param_dtype,
    "attention_impl": lambda: _same_output_other_program(DENSE.replace(attention_impl="reference"),
                                                         attention_impl="blocked"),
    "attention_block_size": lambda: _same_output_other_program(DENSE.replace(attention_impl="blocked"),
                                                               attention_block_size=4),
    "kv_cache_dtype": _kv_cache_dtype,
    "matmul_quant": _matmul_quant,
    "moe_impl": _moe_impl,
    "moe_dispatch": _moe_dispatch,
    "moe_chunk_tokens": _moe_chunk_tokens,
    "scan_layers": lambda: _same_output_other_program(DENSE, scan_layers=False),
    "remat": _remat,
    "initializer_range": _initializer_range,
    "loss_chunk_size": _loss_chunk_size,
    "platform": _platform,
}


def test_every_field_has_a_check():
    assert set(FIELD_CHECKS) == {f.name for f in dataclasses.fields(mj.ModelConfig)}


@pytest.mark.parametrize("field", sorted(FIELD_CHECKS))
@pytest.mark.slow
def test_field_changes_behaviour(field):
    FIELD_CHECKS[field]()  # each check asserts


def test_every_config_field_has_its_comment():
    """configs/base.py documents each leaf field of ``get_config()`` where it is set: a comment on the assignment's
    line or on the lines right above it (the configuration reference is read from these comments). The
    ``config.model`` overrides are ModelConfig's fields: each has its comment the same way in mistral_jax/config.py."""
    import inspect
    import re

    from configs import base
    from mistral_jax import config as config_lib
    from mistral_jax.training import recipe

    lines = inspect.getsource(base).splitlines()
    missing = []
    leaves = _leaf_paths(base.get_config().to_dict())
    assert len(leaves) > 50
    blocks = recipe.config_blocks()  # a registered recipe's block is documented in its config_defaults
    for path in leaves:
        if path.startswith("model.") and path != "model.preset":
            continue
        if path.split(".")[0] in blocks:
            source = inspect.getsource(recipe.RECIPES[path.split(".")[0]].config_defaults).splitlines()
            (i,) = [i for i, line in enumerate(source) if re.match(rf"^\s*\w+\.{re.escape(path.split('.', 1)[1])}\s*=",
                                                                 line)]
            if "#" not in source[i] and not source[i - 1].strip().startswith("#"):
                missing.append(path)
            continue
        head, _, leaf = path.rpartition(".")
        owner = "c" + ("." + head if head else "") if not path.startswith("model.") else "m"
        pattern = re.compile(rf"^\s*{re.escape(owner)}\.{re.escape(leaf)}\s*=")
        at = [i for i, line in enumerate(lines) if pattern.match(line)]
        assert at, f"{path}: no `{owner}.{leaf} = ...` line in configs/base.py"
        i = at[0]
        if "#" not in lines[i] and not lines[i - 1].strip().startswith("#"):
            missing.append(path)
    assert not missing, (f"configs/base.py (or a recipe's config_defaults): fields without a comment on their line (or "
                         f"right above it): {missing}. Fix: say what each one does in a comment on its line.")

    source = inspect.getsource(config_lib.ModelConfig).splitlines()
    no_comment = []
    for f in dataclasses.fields(mj.ModelConfig):
        (i,) = [i for i, s in enumerate(source) if re.match(rf"^\s+{f.name}\s*:", s)]
        if "#" not in source[i] and not source[i - 1].strip().startswith("#"):
            no_comment.append(f.name)
    assert not no_comment, (f"ModelConfig fields without a comment on their line or right above it "
                            f"(mistral_jax/config.py): {no_comment}. Fix: say what each one does there.")


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaf_paths(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out
