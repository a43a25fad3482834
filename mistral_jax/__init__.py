"""mistral_jax: Mistral 7B and Mixtral 8x7B in JAX / Flax NNX."""

from mistral_jax.config import ModelConfig
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.model.kv_cache import KVCache
from mistral_jax.model.transformer import ModelOutput, Transformer, count_active_params, count_params

__all__ = ["KVCache", "ModelConfig", "ModelOutput", "Tokenizer", "Transformer", "count_active_params", "count_params"]

from mistral_jax.inference.generate import generate  # noqa: E402

__all__ += ["generate"]

from mistral_jax.export import ConversionError, convert, save_hf, save_jax, save_mistral, save_peft  # noqa: E402
from mistral_jax.loading import load_pretrained  # noqa: E402

__all__ += ["ConversionError", "convert", "load_pretrained", "save_hf", "save_jax", "save_mistral", "save_peft"]

from mistral_jax.lora import apply_lora, merge_lora  # noqa: E402

__all__ += ["apply_lora", "merge_lora"]

from mistral_jax.quant import quantize_weights  # noqa: E402

__all__ += ["quantize_weights"]
