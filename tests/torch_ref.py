"""The oracle: HF transformers' PyTorch Mistral / Mixtral, built in-process with our weights copied in.

The copy uses the *in-memory* parameter names of the installed transformers (the fused expert tensors of
transformers >= 5 included); it is independent of mistral_jax.convert, which writes the on-disk names.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from flax import nnx

import mistral_jax as mj


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32).copy())


def hf_model(cfg: mj.ModelConfig, model: mj.Transformer, attn: str = "eager"):
    """A float32 HF model with ``model``'s weights (eval mode)."""
    hf_cfg_cls = transformers.MixtralConfig if cfg.is_moe else transformers.MistralConfig
    hc = hf_cfg_cls(**cfg.to_hf("float32"))
    hc._attn_implementation = attn
    cls = transformers.MixtralForCausalLM if cfg.is_moe else transformers.MistralForCausalLM
    torch.manual_seed(0)
    hf = cls(hc).float().eval()
    p = nnx.state(model, nnx.Param)
    d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    sd = {"model.embed_tokens.weight": t(p["embed"][...]), "model.norm.weight": t(p["norm"]["weight"][...])}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = t(p["lm_head"][...]).T
    L = p["layers"]
    for i in range(cfg.n_layers):
        a, pre = L["attention"], f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = t(a["wq"][...][i]).reshape(d, n * h).T
        sd[pre + "self_attn.k_proj.weight"] = t(a["wk"][...][i]).reshape(d, k * h).T
        sd[pre + "self_attn.v_proj.weight"] = t(a["wv"][...][i]).reshape(d, k * h).T
        sd[pre + "self_attn.o_proj.weight"] = t(a["wo"][...][i]).reshape(n * h, d).T
        sd[pre + "input_layernorm.weight"] = t(L["attention_norm"]["weight"][...][i])
        sd[pre + "post_attention_layernorm.weight"] = t(L["ffn_norm"]["weight"][...][i])
        f = L["feed_forward"]
        if cfg.is_moe:
            sd[pre + "mlp.gate.weight"] = t(f["gate"][...][i]).T
            w1, w3, w2 = (t(f[w][...][i]) for w in ("w1", "w3", "w2"))  # [E, D, F], [E, D, F], [E, F, D]
            sd[pre + "mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous()
            sd[pre + "mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
        else:
            sd[pre + "mlp.gate_proj.weight"] = t(f["w1"][...][i]).T
            sd[pre + "mlp.up_proj.weight"] = t(f["w3"][...][i]).T
            sd[pre + "mlp.down_proj.weight"] = t(f["w2"][...][i]).T
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"weight copy mismatch: missing={missing} unexpected={unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf
