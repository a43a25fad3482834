"""Parity with HF transformers' PyTorch Mistral / Mixtral (float32, atol 1e-4), per module and end to end.

The random models use ``initializer_range`` 0.2 (not the 0.02 default): with 0.02 attention is nearly uniform and
logits stay below 1, so zeroing ``wk`` or a 1% ``rope_theta`` error moved them by less than the tolerance.
``test_oracle_sees_attention`` checks that such errors are now far above it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from tests.helpers import random_tokens

pytestmark = pytest.mark.oracle  # every test here compares with HF transformers' PyTorch model

ATOL = 1e-4

INIT = 0.2  # weights large enough that attention patterns and RoPE phases show in the logits (see above)
CONFIGS = {
    # window 16 with T = 40 > 2W; blocked backend (block 8) and the reference oracle
    "mistral_blocked": mj.ModelConfig.tiny(attention_impl="blocked", attention_block_size=8, initializer_range=INIT),
    "mistral_reference": mj.ModelConfig.tiny(attention_impl="reference", sliding_window=7, rope_theta=1e6,
                                             initializer_range=INIT),
    "mistral_nowindow_gqa1": mj.ModelConfig.tiny(sliding_window=None, n_kv_heads=1, norm_eps=1e-6,
                                                 initializer_range=INIT),
    "mixtral_ragged": mj.ModelConfig.tiny_mixtral(moe_impl="ragged", initializer_range=INIT),
    "mixtral_dense_window": mj.ModelConfig.tiny_mixtral(moe_impl="dense", sliding_window=9, num_experts_per_tok=1,
                                                        initializer_range=INIT),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_logits_match_hf(name, seed):
    import torch

    from tests.torch_ref import hf_model

    cfg = CONFIGS[name]
    model = mj.Transformer(cfg, rngs=nnx.Rngs(seed))
    hf = hf_model(cfg, model)
    tokens = random_tokens(seed, cfg.vocab_size, 3, 40)
    assert tokens.shape[1] > 2 * (cfg.sliding_window or 0)
    ours = np.asarray(model(tokens))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert ours.shape == ref.shape == (3, 40, cfg.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mistral_blocked", "mixtral_ragged"])
@pytest.mark.slow
def test_oracle_sees_attention(name):
    """The parity tolerance is tight enough to catch attention bugs: each broken variant misses it by >= 100x."""
    import torch

    from tests.torch_ref import hf_model

    cfg = CONFIGS[name]
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = torch.from_numpy(random_tokens(0, cfg.vocab_size, 3, 40)).long()
    ours = np.asarray(model(tokens.numpy()))

    def gap(hf):
        with torch.no_grad():
            return float(np.abs(hf(tokens).logits.numpy() - ours).max())

    assert gap(hf_model(cfg, model)) < ATOL
    assert gap(hf_model(dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 1.01), model)) > 100 * ATOL
    window = cfg.sliding_window + 1 if cfg.sliding_window else 20  # off by one, or a window where there is none
    assert gap(hf_model(dataclasses.replace(cfg, sliding_window=window), model)) > 100 * ATOL
    hf = hf_model(cfg, model)
    with torch.no_grad():
        hf.model.layers[0].self_attn.k_proj.weight.zero_()  # uniform attention in layer 0
    assert gap(hf) > 100 * ATOL


def _capture(hf, tokens, attention_mask=None):
    """Inputs and outputs of layer 0, its attention and its MLP/MoE block, via forward hooks."""
    import torch

    seen = {}
    layer = hf.model.layers[0]

    def hook(name):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            seen[name] = (x.detach().numpy(), (out[0] if isinstance(out, tuple) else out).detach().numpy())
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True)
               for n, m in (("layer", layer), ("attn", layer.self_attn), ("mlp", layer.mlp))]
    with torch.no_grad():
        out = hf(torch.from_numpy(tokens).long(), attention_mask=attention_mask,
                 output_router_logits=hasattr(hf.config, "num_local_experts"))
    for h in handles:
        h.remove()
    return seen, out


@pytest.mark.parametrize("name", ["mistral_reference", "mixtral_ragged", "mixtral_dense_window"])
@pytest.mark.slow
def test_module_parity(name):
    from tests.torch_ref import hf_model

    cfg = CONFIGS[name]
    model = mj.Transformer(cfg, rngs=nnx.Rngs(7))
    hf = hf_model(cfg, model)
    tokens = random_tokens(7, cfg.vocab_size, 2, 33)
    seen, _ = _capture(hf, tokens)
    graphdef, state = nnx.split(model.layers)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))  # layer 0 of the stacked layers
    positions = np.broadcast_to(np.arange(33, dtype=np.int32), (2, 33))

    x, y = seen["attn"]
    ours, _ = layer.attention(x, positions, None)
    np.testing.assert_allclose(np.asarray(ours), y, atol=ATOL, rtol=0)

    x, y = seen["mlp"]
    ours = layer.feed_forward(x)
    ours = ours[0] if isinstance(ours, tuple) else ours
    np.testing.assert_allclose(np.asarray(ours), y, atol=ATOL, rtol=0)

    x, y = seen["layer"]
    ours, _, _ = layer(x, positions, None)
    np.testing.assert_allclose(np.asarray(ours), y, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.slow
def test_load_balancing_loss_matches_hf(padded):
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tests.torch_ref import hf_model

    cfg = CONFIGS["mixtral_ragged"]
    model = mj.Transformer(cfg, rngs=nnx.Rngs(3))
    hf = hf_model(cfg, model)
    tokens = random_tokens(3, cfg.vocab_size, 2, 24)
    lengths = np.array([24, 15])
    valid = (np.arange(24)[None] < lengths[:, None]) if padded else np.ones((2, 24), bool)
    mask = torch.from_numpy(valid.astype(np.int64)) if padded else None
    _, out = _capture(hf, tokens, attention_mask=mask)
    ref = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, mask).item()
    segment_ids = valid.astype(np.int32) if padded else None  # segment 0 = padding, excluded like HF's mask
    _, aux = model(tokens, segment_ids=segment_ids, return_aux=True)
    np.testing.assert_allclose(float(aux["load_balancing_loss"]), ref, rtol=1e-5)
    # expert load: per layer, fractions of the top-k assignments, summing to one
    np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), 1.0, rtol=1e-6)
    # z-loss: mean of logsumexp(router logits)^2 over valid tokens of all layers
    flat = valid.reshape(-1)
    lse = [torch.logsumexp(r, -1).numpy()[flat] for r in out.router_logits]
    np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(np.concatenate(lse) ** 2), rtol=1e-4)


# ------------------------------------------------------------------ fast tier: HF-built models through the converter
# The one end-to-end check against PyTorch in `make test-fast`: transformers builds tiny random Mistral and Mixtral
# models (test_convert.py's configs, with a sliding window shorter than the sequence and weights large enough that
# a 1% rope_theta error shows, see the module docstring), the project's converter loads their saved files, and the
# logits and the Mixtral training loss (CE + router_aux_loss_coef * load balancing) must equal HF's.
FAST = {"mistral": {"sliding_window": 8, "initializer_range": INIT},
        "mixtral": {"sliding_window": 8, "initializer_range": INIT, "router_aux_loss_coef": 0.3}}  # not the default


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{arch: (HF float32 model, its files loaded by mj.load_pretrained)}."""
    import torch
    import transformers

    from tests.test_convert import HF_CONFIGS

    out = {}
    for arch, overrides in FAST.items():
        cls_name, kwargs = HF_CONFIGS[arch]
        torch.manual_seed(0)
        hf = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(
            getattr(transformers, cls_name)(**{**kwargs, **overrides})).float().eval()
        path = tmp_path_factory.mktemp(f"fast_{arch}")
        hf.save_pretrained(path)
        out[arch] = hf, mj.load_pretrained(path)
    return out


@pytest.mark.parametrize("arch", sorted(FAST))
def test_converted_hf_model_logits_match_hf(converted, arch):
    import torch

    hf, model = converted[arch]
    assert (model.cfg.sliding_window, model.cfg.is_moe) == (8, arch == "mixtral")
    tokens = random_tokens(11, model.cfg.vocab_size, 2, 24)  # 3 windows
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(ref).max() > 1.0  # attention and RoPE show in the logits
    np.testing.assert_allclose(np.asarray(model(tokens)), ref, atol=ATOL, rtol=0)


def test_converted_mixtral_loss_matches_hf(converted):
    """HF's loss with labels and router logits is CE + router_aux_loss_coef * load balancing (padding excluded);
    ours (training.loss.loss_fn, z-loss off) must equal it, the coefficient read from the converted config."""
    import jax.numpy as jnp
    import torch

    from mistral_jax.training.loss import loss_fn
    from tests.test_loss import _mixtral_batch

    hf, model = converted["mixtral"]
    assert model.cfg.router_aux_loss_coef == FAST["mixtral"]["router_aux_loss_coef"]
    assert model.cfg.router_z_loss_coef == 0
    batch, ids, labels, mask = _mixtral_batch(model.cfg, [24, 15])
    with torch.no_grad():
        out = hf(ids, labels=labels, attention_mask=mask, output_router_logits=True)
    loss, metrics = loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(metrics["aux_loss"]), out.aux_loss.item(), rtol=1e-5)
    assert 0.3 * out.aux_loss.item() > 100 * 1e-5 * out.loss.item()  # the aux term is far above the tolerance
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
