"""mistral_jax: Mistral 7B and Mixtral 8x7B in JAX / Flax NNX."""

from mistral_jax.config import ModelConfig
from mistral_jax.model.kv_cache import KVCache
from mistral_jax.model.transformer import Transformer, count_active_params, count_params

__all__ = ["KVCache", "ModelConfig", "Transformer", "count_active_params", "count_params"]
