"""Inference: chunked prefill and decoding over the rolling-buffer KV cache, sampling, ``generate``, and the
per-layer serving weights (``per_layer``: the model's forward over separate per-layer weight copies, for CPU).

``mistral_jax.inference.generate`` is the module; the function is ``mistral_jax.generate`` (or
``mistral_jax.inference.generate.generate``).
"""

from mistral_jax.inference.sampling import filter_logits, sample

__all__ = ["filter_logits", "sample"]
