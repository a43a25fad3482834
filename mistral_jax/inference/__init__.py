"""Inference: chunked prefill and decoding over the rolling-buffer KV cache, sampling, ``generate``.

``mistral_jax.inference.generate`` is the module; the function is ``mistral_jax.generate`` (or
``mistral_jax.inference.generate.generate``).
"""

from mistral_jax.inference.sampling import filter_logits, sample

__all__ = ["filter_logits", "sample"]
