"""The checkpoint file formats: HF transformers safetensors (``hf``), Mistral consolidated (``mistral``) and
mistral_jax's own (``native``), their key tables (``keys``), by topic: ``sources`` (tensor sources, mismatch
collection, JSON configs), ``dtypes``, ``writing`` (shards), ``build`` (parameters on a mesh), ``tokenizer_files``,
streaming safetensors I/O (``safetensors_io``), output-path safety, atomic output directories and the completion
marker of bucket exports (``paths``), and the file operations of all of them on local paths and buckets
(``files``).

Exporting a model and converting between formats is ``mistral_jax.export`` (``mj.save_hf``, ``mj.convert``);
reading any checkpoint is ``mistral_jax.loading`` (``mj.load_pretrained``). Both sit above this package, which
imports neither.
"""

from mistral_jax.convert.sources import ConversionError

__all__ = ["ConversionError"]
