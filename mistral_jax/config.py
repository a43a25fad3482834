"""Model configuration: a frozen, validated dataclass with presets and HF / Mistral conversions.

The model config describes the network (shapes, RoPE, window, experts) and how it is computed (dtypes,
attention and MoE backends, scan/remat). The *run* config (optimizer, data, mesh) is an ml_collections
ConfigDict under ``configs/``; model code never sees it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

MoEDispatch = Literal["all_to_all", "all_gather"]
RematPolicy = Literal["none", "full", "save_dots", "save_qkv_proj", "save_dots_no_batch", "offload"]
Platform = Literal["", "cpu", "gpu", "tpu"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# ModelConfig.matmul_quant's values: no quantization, or model/quantized.py's qwix modes
MATMUL_QUANT = ("none", "int8", "fp8")


class ConfigError(ValueError):
    """A run config that cannot work (the message names the field, its value and the fix)."""


def _runtime(default: Any) -> Any:
    """A runtime field (dtypes, backends, scan / remat, loss weights): see ``ModelConfig.RUNTIME_FIELDS``."""
    return dataclasses.field(default=default, metadata={"runtime": True})


def _bad(field: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"ModelConfig.{field}={value!r}: {why}. Fix: {fix}.")


def _check_count(field: str, value: Any, unit: str, fix: str) -> None:
    """A size field: an integer >= 0 (0 = off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(field, value, f"must be an integer >= 0 ({unit})", fix)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and numerics of a Mistral / Mixtral decoder.

    Attributes mirror HF ``MistralConfig`` / ``MixtralConfig`` (names in comments).
    """

    vocab_size: int = 32000  # vocab_size
    dim: int = 4096  # hidden_size
    n_layers: int = 32  # num_hidden_layers
    n_heads: int = 32  # num_attention_heads
    n_kv_heads: int = 8  # num_key_value_heads (GQA groups = n_heads // n_kv_heads)
    head_dim: int = 128  # head_dim
    hidden_dim: int = 14336  # intermediate_size (per expert for MoE)
    norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0  # rope_theta
    sliding_window: int | None = 4096  # sliding_window; None = plain causal attention
    max_seq_len: int = 32768  # max_position_embeddings (bounds caches and the rope table)
    tie_embeddings: bool = False  # tie_word_embeddings
    # Mixture of experts (num_experts == 0 -> dense SwiGLU MLP).
    num_experts: int = 0  # num_local_experts
    num_experts_per_tok: int = 2  # num_experts_per_tok (top-k)
    # ---- runtime choices (RUNTIME_FIELDS): how the network is computed and trained, not what it is. A run
    # may change them freely (init_from, resume); they never change which parameters exist.
    router_aux_loss_coef: float = _runtime(0.02)  # router_aux_loss_coef (HF units, see moe.load_balancing_loss)
    router_z_loss_coef: float = _runtime(0.0)  # ST-MoE router z-loss weight (0 = off)
    dtype: str = _runtime("float32")  # activation / matmul dtype
    param_dtype: str = _runtime("float32")  # parameter (master weight) dtype
    attention_impl: str = _runtime("auto")  # "auto" (picked for `platform`) or a name registered in model/backends.py
    attention_block_size: int = _runtime(512)  # query block of the blocked banded backend (<= max(64, W/4))
    # the decoding KV cache: "auto" holds keys and values in the compute dtype; "int8" in int8 with one float32
    # scale per slot and kv head (half a bfloat16 cache's bytes; model/kv_cache.py)
    kv_cache_dtype: str = _runtime("auto")
    # quantized training (model/quantized.py, qwix): the decoder layers' weight matmuls (projections, experts)
    # multiply quantized operands, gradients too; master weights, optimizer, embedding, router, head stay float.
    # "none", "int8" (int8 operands and gradients) or "fp8" (float8_e4m3fn operands, float8_e5m2 gradients)
    matmul_quant: str = _runtime("none")
    moe_impl: str = _runtime("ragged")  # "dense" oracle, "ragged" / "expert_parallel": dropless, EP on an expert mesh
    # Expert parallelism (model/moe.py): how tokens reach the experts' shards. "all_to_all": each assignment goes
    # to its expert's shard and back (ragged all-to-all); "all_gather": every shard sees every token of its group.
    moe_dispatch: MoEDispatch = _runtime("all_to_all")
    moe_chunk_tokens: int = _runtime(0)  # all_to_all: tokens per shard per dispatch (bounds its buffers); 0 = all
    scan_layers: bool = _runtime(True)  # lax.scan over stacked layers (one compiled layer) vs a Python loop
    remat: RematPolicy = _runtime("none")  # activation checkpointing policy per layer
    # Training loss over chunks of this many positions (training/loss.chunked_cross_entropy): the float32
    # [B, T, V] logits are never held, only [B, chunk, V] at a time (recomputed in the backward pass). 0 = off.
    loss_chunk_size: int = _runtime(0)
    initializer_range: float = _runtime(0.02)  # std of the normal init of weights
    # The platform the program is built for: "cpu", "gpu" or "tpu"; "" = the host's default backend, filled in
    # by ``for_platform`` (the Transformer calls it at construction). "auto" backends are resolved from this
    # field, never from the host, so an ahead-of-time compile for a TPU on a CPU host builds the TPU program.
    platform: Platform = _runtime("")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise _bad(name, value, "must be a positive integer", f"set {name} to an integer > 0")
        if self.n_heads % self.n_kv_heads:
            raise _bad(
                "n_heads",
                self.n_heads,
                f"not divisible by n_kv_heads={self.n_kv_heads} (GQA needs whole groups)",
                "choose n_kv_heads dividing n_heads, e.g. 8 for 32 heads",
            )
        if self.head_dim % 2:
            raise _bad("head_dim", self.head_dim, "must be even for rotary embeddings", "use an even head_dim")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise _bad("sliding_window", self.sliding_window, "must be a positive integer or None",
                       "use None for full causal attention or W >= 1")
        if self.num_experts < 0:
            raise _bad("num_experts", self.num_experts, "must be >= 0", "use 0 for a dense MLP")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise _bad("num_experts_per_tok", self.num_experts_per_tok,
                       f"top-k must be in [1, num_experts={self.num_experts}]", "lower num_experts_per_tok")
        if self.norm_eps <= 0:
            raise _bad("norm_eps", self.norm_eps, "must be > 0", "use 1e-5 as Mistral does")
        if self.rope_theta <= 0:
            raise _bad("rope_theta", self.rope_theta, "must be > 0", "use 1e4 (Mistral v0.1) or 1e6 (v0.2+, Mixtral)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise _bad(name, getattr(self, name), f"unknown dtype, expected one of {sorted(_DTYPES)}",
                           "pass the dtype name as a string")
        # the registry, imported here and not at the top: the backends register as the model's modules import, and
        # those import this module (importing mistral_jax imports them all)
        from mistral_jax.model import backends

        if self.attention_impl not in backends.attention_impls():
            raise _bad("attention_impl", self.attention_impl, "unknown attention backend",
                       f"use one of {', '.join(backends.attention_impls())} (or register yours with "
                       "mistral_jax.model.backends.register_attention)")
        if self.attention_block_size <= 0:
            raise _bad("attention_block_size", self.attention_block_size, "must be > 0", "use e.g. 512")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise _bad("kv_cache_dtype", self.kv_cache_dtype, "unknown KV cache dtype",
                       "use auto (the compute dtype) or int8 (per-head scales)")
        if self.moe_impl not in backends.MOE_IMPLS:
            raise _bad("moe_impl", self.moe_impl, "unknown MoE backend", f"use one of {', '.join(backends.MOE_IMPLS)}")
        if self.matmul_quant not in MATMUL_QUANT:
            raise _bad("matmul_quant", self.matmul_quant, "unknown quantized-training mode",
                       f"use one of {', '.join(MATMUL_QUANT)}")
        if self.matmul_quant != "none" and self.num_experts and self.moe_impl == "dense":
            raise _bad("matmul_quant", self.matmul_quant, "is not supported by moe_impl='dense' (the oracle's "
                       "einsums over all experts are not quantized)", "use moe_impl='ragged' (or expert_parallel)")
        if self.moe_dispatch not in ("all_to_all", "all_gather"):
            raise _bad("moe_dispatch", self.moe_dispatch, "unknown expert-parallel dispatch",
                       "use all_to_all or all_gather")
        _check_count("moe_chunk_tokens", self.moe_chunk_tokens, "tokens per dispatch chunk",
                     "use 0 to dispatch all of a shard's tokens at once, or e.g. 4096")
        if self.remat not in ("none", "full", "save_dots", "save_qkv_proj", "save_dots_no_batch", "offload"):
            raise _bad("remat", self.remat, "unknown remat policy",
                       "use none, full, offload, save_dots, save_qkv_proj or save_dots_no_batch")
        _check_count("loss_chunk_size", self.loss_chunk_size, "positions per loss chunk",
                     "use 0 for the unchunked loss, or e.g. 1024 / 2048 to chunk the logits over the sequence")
        if self.platform not in ("", "cpu", "gpu", "tpu"):
            raise _bad("platform", self.platform, "unknown platform", "use cpu, gpu or tpu (or '' for the host's)")

    # ------------------------------------------------------------------ architecture vs runtime
    @classmethod
    def runtime_fields(cls) -> tuple[str, ...]:
        """Fields that say how the network is computed (dtypes, backends, scan, remat, loss weights, platform)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))

    @classmethod
    def architecture_fields(cls) -> tuple[str, ...]:
        """Fields that say what the network is: its parameters' shapes and the function they compute."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("runtime"))

    def architecture(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.architecture_fields()}

    def runtime(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.runtime_fields()}

    def with_architecture_of(self, other: ModelConfig) -> ModelConfig:
        """This config's runtime choices on ``other``'s architecture (``init_from`` keeps the run's numerics)."""
        return dataclasses.replace(self, **other.architecture())

    @staticmethod
    def resolve_platform(platform: str | None = None) -> str:
        """``platform`` as a ``platform`` field value ("cpu", "gpu", "tpu"): a device's ``platform`` or a backend
        name (cuda / rocm are "gpu"); None or "" = the host's default backend."""
        if not platform:
            import jax  # local: importing the config must not start a backend

            platform = jax.default_backend()
        return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)

    def for_platform(self, platform: str | None = None) -> ModelConfig:
        """This config built for ``platform`` ("cpu", "gpu", "tpu"; None = the host's default backend)."""
        return self.replace(platform=self.resolve_platform(platform))

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}. "
                             f"Fix: use one of {sorted(f.name for f in dataclasses.fields(self))}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}. Fix: use one of {sorted(names)}.")
        return cls(**d)

    # ------------------------------------------------------------------ presets
    @classmethod
    def mistral_7b_v01(cls, **kw: Any) -> ModelConfig:
        """Mistral 7B v0.1: 4096-token sliding window, theta 1e4 (7,241,732,096 parameters)."""
        return cls(**{**dict(sliding_window=4096, rope_theta=1e4, max_seq_len=32768), **kw})

    @classmethod
    def mistral_7b_v02(cls, **kw: Any) -> ModelConfig:
        """Mistral 7B v0.2/v0.3 geometry: no window, theta 1e6, 32k context."""
        return cls(**{**dict(sliding_window=None, rope_theta=1e6, max_seq_len=32768), **kw})

    @classmethod
    def mixtral_8x7b(cls, **kw: Any) -> ModelConfig:
        """Mixtral 8x7B: 8 experts, top-2, no window, theta 1e6 (46,702,792,704 parameters)."""
        return cls(**{**dict(sliding_window=None, rope_theta=1e6, max_seq_len=32768, num_experts=8,
                             num_experts_per_tok=2, router_aux_loss_coef=0.02), **kw})

    @classmethod
    def mistral_7b_v03(cls, **kw: Any) -> ModelConfig:
        """Mistral 7B v0.3: the v0.2 geometry with the 32768-piece v3 vocabulary (``mistral:v3``, control tokens
        [INST]=3, [/INST]=4); no window, theta 1e6, 32k context (7,248,023,552 parameters)."""
        return cls(**{**dict(vocab_size=32768, sliding_window=None, rope_theta=1e6, max_seq_len=32768), **kw})

    @classmethod
    def mixtral_8x22b(cls, **kw: Any) -> ModelConfig:
        """Mixtral 8x22B: 56 layers, dim 6144, 48 heads / 8 KV heads, 8 experts x 16384 hidden, top-2, v3
        vocabulary (32768), theta 1e6, 64k context, router aux coefficient 0.001 as released
        (140,630,071,296 parameters, 39,161,468,928 active per token)."""
        return cls(**{**dict(vocab_size=32768, dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128,
                             hidden_dim=16384, sliding_window=None, rope_theta=1e6, max_seq_len=65536, num_experts=8,
                             num_experts_per_tok=2, router_aux_loss_coef=0.001), **kw})

    @classmethod
    def mistral_nemo_12b(cls, **kw: Any) -> ModelConfig:
        """Mistral NeMo 12B (2407): 40 layers, dim 5120, 32 heads / 8 KV heads of head_dim 128 (not dim / heads =
        160), hidden 14336, tekken vocabulary (131072, ``mistral:tekken``), theta 1e6, no window, the published
        max_position_embeddings 1,024,000 (trained at 128k) (12,247,782,400 parameters)."""
        return cls(**{**dict(vocab_size=131072, dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128,
                             hidden_dim=14336, sliding_window=None, rope_theta=1e6, max_seq_len=1024000), **kw})

    @classmethod
    def tiny(cls, **kw: Any) -> ModelConfig:
        """A CPU-sized Mistral for tests and the demo (window 16, 2 layers)."""
        return cls(**{**dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                             hidden_dim=128, sliding_window=16, rope_theta=1e4, max_seq_len=512,
                             attention_block_size=16), **kw})

    @classmethod
    def tiny_mixtral(cls, **kw: Any) -> ModelConfig:
        """A CPU-sized Mixtral (4 experts, top-2) for tests."""
        return cls.tiny(**{**dict(num_experts=4, num_experts_per_tok=2, sliding_window=None, rope_theta=1e6), **kw})

    @classmethod
    def preset(cls, name: str, **kw: Any) -> ModelConfig:
        """Look a preset up by name (``mistral_7b_v01``, ``mixtral_8x7b``, ``tiny`` ...)."""
        presets = {n: getattr(cls, n) for n in ("mistral_7b_v01", "mistral_7b_v02", "mistral_7b_v03", "mixtral_8x7b",
                                                  "mixtral_8x22b", "mistral_nemo_12b", "tiny", "tiny_mixtral")}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}. Fix: use one of {sorted(presets)}.")
        return presets[name](**kw)

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | Any, **kw: Any) -> ModelConfig:
        """Build from an HF ``MistralConfig`` / ``MixtralConfig`` (object or ``config.json`` dict)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type")
        if model_type not in ("mistral", "mixtral"):
            raise ValueError(f"HF config has model_type={model_type!r}; only 'mistral' and 'mixtral' are supported. "
                             "Fix: point at a Mistral or Mixtral checkpoint.")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"HF config hidden_act={d.get('hidden_act')!r}; Mistral uses 'silu'.")
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        window = d.get("sliding_window")
        fields = dict(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            hidden_dim=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=float(rope_theta),
            sliding_window=int(window) if window else None,
            max_seq_len=d.get("max_position_embeddings", 32768),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
        )
        if model_type == "mixtral":
            fields.update(num_experts=d["num_local_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                          router_aux_loss_coef=d.get("router_aux_loss_coef", 0.02))
        fields.update(kw)
        return cls(**fields)

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The HF ``config.json`` dict (MistralConfig or MixtralConfig) for this model."""
        d: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.dim, intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim, hidden_act="silu", max_position_embeddings=self.max_seq_len,
            initializer_range=self.initializer_range, rms_norm_eps=self.norm_eps, use_cache=True,
            rope_theta=self.rope_theta, sliding_window=self.sliding_window, attention_dropout=0.0,
            tie_word_embeddings=self.tie_embeddings, bos_token_id=1, eos_token_id=2,
            torch_dtype=dtype or self.param_dtype,
        )
        if self.is_moe:
            d.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=self.num_experts,
                     num_experts_per_tok=self.num_experts_per_tok, router_aux_loss_coef=self.router_aux_loss_coef,
                     output_router_logits=False, router_jitter_noise=0.0)
        else:
            d.update(model_type="mistral", architectures=["MistralForCausalLM"])
        return d

    # ------------------------------------------------------------------ Mistral consolidated
    @classmethod
    def from_mistral_params(cls, p: dict[str, Any], **kw: Any) -> ModelConfig:
        """Build from Mistral's consolidated ``params.json``."""
        try:
            fields = dict(
                dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                n_kv_heads=p.get("n_kv_heads", p["n_heads"]), head_dim=p.get("head_dim") or p["dim"] // p["n_heads"],
                hidden_dim=p["hidden_dim"], norm_eps=p.get("norm_eps", 1e-5), vocab_size=p["vocab_size"],
                rope_theta=float(p.get("rope_theta", 1e4)),
                sliding_window=p.get("sliding_window") or None,
                tie_embeddings=bool(p.get("tied_embeddings", False)),
            )
        except KeyError as e:
            raise ValueError(f"params.json lacks required key {e}; keys present: {sorted(p)}. "
                             "Fix: use a Mistral consolidated params.json.") from e
        if p.get("max_seq_len"):
            fields["max_seq_len"] = p["max_seq_len"]
        moe = p.get("moe")
        if moe:
            fields.update(num_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"])
        fields.update(kw)
        return cls(**fields)

    def to_mistral_params(self) -> dict[str, Any]:
        """Mistral's consolidated ``params.json``."""
        p: dict[str, Any] = dict(dim=self.dim, n_layers=self.n_layers, head_dim=self.head_dim,
                                 hidden_dim=self.hidden_dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                 norm_eps=self.norm_eps, vocab_size=self.vocab_size, rope_theta=self.rope_theta,
                                 max_seq_len=self.max_seq_len)
        if self.sliding_window is not None:
            p["sliding_window"] = self.sliding_window
        if self.tie_embeddings:
            p["tied_embeddings"] = True
        if self.is_moe:
            p["moe"] = dict(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        return p
