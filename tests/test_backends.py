"""The backend registry (model/backends.py): backends come from the target platform and the mesh passed in
explicitly, never from the active mesh; unknown or unsupported backends are refused with the options named."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import sharding as sh
from mistral_jax.model import backends

# a TPU program traced on this CPU host: splash (T % 128 == 0), megablox, and expert parallelism when given a mesh
TPU_MIXTRAL = mj.ModelConfig.tiny_mixtral(num_experts=8, platform="tpu")
PRIMITIVES = ("shard_map", "pallas_call", "ragged_dot_general", "ragged_all_to_all", "all_to_all", "all_gather")


def _primitives(model, tokens) -> dict[str, int]:
    """How often each backend-identifying primitive occurs in the traced forward pass."""
    text = str(jax.make_jaxpr(lambda x: model(x))(tokens))
    return {p: len(re.findall(rf"\b{p}\[", text)) for p in PRIMITIVES}


@pytest.mark.heavy  # 3-5 s on 2 busy cores: the light tier stays near its 90 s
def test_the_choice_ignores_the_active_mesh():
    """The same forward traced outside and under ``use_mesh`` of an expert-parallel mesh runs the same backends;
    only the mesh passed to the model switches to expert parallelism (and splash's shard_map), with or without an
    active mesh."""
    mesh, rules = sh.make_mesh(fsdp=2, expert=4), sh.rules_preset("fsdp_tp_ep")
    tokens = np.zeros((8, 128), np.int32)
    plain = mj.Transformer(TPU_MIXTRAL, rngs=nnx.Rngs(0))
    outside = _primitives(plain, tokens)
    with sh.use_mesh(mesh, rules):
        inside = _primitives(plain, tokens)
    assert inside == outside
    assert outside["shard_map"] == 0 and outside["ragged_dot_general"] > 0 and outside["pallas_call"] > 0
    assert plain.backends.moe == "ragged" and plain.backends.mesh is None

    bound = mj.Transformer(TPU_MIXTRAL, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
    assert (bound.backends.moe, bound.backends.expert_mlp, bound.backends.exchange) == (
        "all_to_all", "megablox", "ragged_all_to_all")
    explicit = _primitives(bound, tokens)
    with sh.use_mesh(mesh, rules):
        assert _primitives(bound, tokens) == explicit
    assert explicit["shard_map"] > 0 and explicit["ragged_all_to_all"] > 0

    # bind: the same choice for a model built without the mesh (e.g. an abstract one from nnx.eval_shape)
    rebound = backends.bind(nnx.eval_shape(lambda: mj.Transformer(TPU_MIXTRAL, rngs=nnx.Rngs(0))), mesh, rules)
    assert rebound.backends == bound.backends
    assert rebound.layers.feed_forward.backends == bound.backends == rebound.layers.attention.backends


@pytest.mark.parametrize("platform,expected", [
    ("cpu", ("ragged", "looped", "dense_all_to_all")),
    ("gpu", ("ragged", "ragged_dot", "ragged_all_to_all")),
    ("tpu", ("ragged", "megablox", "ragged_all_to_all")),
])
def test_moe_backends_per_platform(platform, expected):
    b = backends.resolve(mj.ModelConfig.tiny_mixtral(platform=platform))
    assert (b.moe, b.expert_mlp, b.exchange) == expected
    dense = backends.resolve(mj.ModelConfig.tiny_mixtral(platform=platform, moe_impl="dense"))
    assert dense.moe == "dense"


def test_expert_parallel_dispatch_modes_follow_the_mesh_and_the_config():
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=8, platform="cpu")
    split = sh.rules_preset("fsdp_tp_ep")  # tokens split over the expert axis
    gathered = sh.ShardingRules({**sh.RULE_PRESETS["fsdp_tp_ep"], "batch": ("data", "fsdp")})
    mesh = sh.make_mesh(fsdp=2, expert=4)
    assert backends.resolve(cfg, mesh, split).moe == "all_to_all"
    assert backends.resolve(cfg.replace(moe_dispatch="all_gather"), mesh, split).moe == "all_gather"
    assert backends.resolve(cfg, mesh, gathered).moe == "all_gather"  # all_to_all needs the tokens split
    assert backends.resolve(cfg, sh.make_mesh(fsdp=8), split).moe == "ragged"  # expert axis of size 1
    assert backends.resolve(cfg.replace(moe_impl="dense"), mesh, split).moe == "dense"


def test_cudnn_attention_is_chosen_for_16_bit_gpu_calls_only():
    """cuDNN's fused attention takes fp16 / bf16 inputs and no segment ids: a float32 or packed GPU call falls back
    (auto: to blocked with a window, named: to reference)."""
    pick = lambda impl, **kw: backends.choose_attention(impl, platform="gpu", self_attention=True, seq_len=4096,
                                                        window=512, block=128, **{"has_segments": False, **kw})
    assert pick("auto") == pick("auto", dtype="float16") == pick("cudnn", dtype="bfloat16") == "cudnn"
    assert pick("auto", dtype="float32") == "blocked" and pick("cudnn", dtype="float32") == "reference"
    assert pick("auto", has_segments=True) == "blocked"
    b = backends.resolve(mj.ModelConfig.tiny(platform="gpu"))  # float32 compute
    from mistral_jax.model.attention import self_attention_backend

    cfg = mj.ModelConfig.tiny(platform="gpu")
    assert self_attention_backend(cfg, b, 64, False) != "cudnn"
    assert self_attention_backend(cfg.replace(dtype="bfloat16"), b, 64, False) == "cudnn"


def test_unknown_or_unsupported_backends_name_the_options():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; registered: \['blocked', 'cudnn', "
                                         r"'halo', 'reference', 'ring', 'splash'\]"):
        backends.choose_attention("flash", platform="cpu", self_attention=True, seq_len=64, window=None, block=16,
                                  has_segments=False)
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' runs on \['gpu'\], not on platform='cpu'. "
                                         r"Fix: use 'auto' or one of \['blocked', 'reference', 'halo', 'ring'\]"):
        mj.Transformer(mj.ModelConfig.tiny(attention_impl="cudnn", platform="cpu"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown MoE backend 'sparse'; registered: \['all_gather', 'all_to_all', "
                                         r"'dense', 'ragged'\]"):
        backends.lookup(backends.MOE, "MoE", "sparse")
    with pytest.raises(ValueError, match=r"unknown platforms \['npu'\]"):
        backends.register_attention("mine", platforms=("npu",))


def test_a_registered_attention_backend_is_chosen_by_name():
    """Adding a backend is one decorated function: a config naming it runs it."""
    calls = []

    @backends.register_attention("test_recorder", platforms=("cpu",))
    def recorder(q, k, v, positions, segment_ids, *, window, block, backends):
        calls.append(q.shape)
        return q

    try:
        tokens = np.zeros((1, 8), np.int32)
        ref = mj.Transformer(mj.ModelConfig.tiny(attention_impl="reference", platform="cpu"), rngs=nnx.Rngs(0))(tokens)
        # ModelConfig's validation reads the registry: naming the new backend needs no edit in config.py
        model = mj.Transformer(mj.ModelConfig.tiny(attention_impl="test_recorder", platform="cpu"), rngs=nnx.Rngs(0))
        assert model.backends.attention == "test_recorder"
        got = model(tokens)
        assert calls and not np.allclose(np.asarray(got), np.asarray(ref))
    finally:
        del backends.ATTENTION["test_recorder"]
    with pytest.raises(ValueError, match=r"attention_impl='test_recorder': unknown attention backend. Fix: use one "
                                         r"of auto, cudnn, splash, blocked, reference, halo, ring \(or register yours"):
        mj.ModelConfig.tiny(attention_impl="test_recorder")
