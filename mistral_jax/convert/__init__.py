"""The checkpoint file formats: HF transformers safetensors (``hf``), Mistral consolidated (``mistral``) and
mistral_jax's own (``native``), their key tables (``keys``), streaming safetensors I/O and output-path safety
(``paths``).

Exporting a model and converting between formats is ``mistral_jax.export`` (``mj.save_hf``, ``mj.convert``);
reading any checkpoint is ``mistral_jax.loading`` (``mj.load_pretrained``). Both sit above this package, which
imports neither.
"""

from mistral_jax.convert.common import ConversionError

__all__ = ["ConversionError"]
