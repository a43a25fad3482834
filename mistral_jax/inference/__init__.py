"""The decoding core: everything that turns a model and prompts into tokens and text, used by ``mj.generate``, the
server (``serve``), the lm-eval backend (``evals.lm``) and RL rollouts.

* ``decode``: chunked prefill, the decode step and the device decode loop over the rolling-buffer KV cache.
* ``sampling``: greedy / temperature / top-k / top-p sampling (batch-wide or per-row settings), token log-probs.
* ``detokenize``: ids -> text (HF-compatible), the incremental detokenizer, stop strings, streamed deltas.
* ``prompt``: prompt text -> ids with literal ``<s>`` / ``</s>`` as control tokens.
* ``generate``: ``mj.generate``, the host loop over the steps.
* ``per_layer``: the per-layer serving weights (a CPU transform applied from outside, ``layers=``).

``mistral_jax.inference.generate`` is the module; the function is ``mistral_jax.generate`` (or
``mistral_jax.inference.generate.generate``).
"""

from mistral_jax.inference.sampling import filter_logits, sample, token_logprobs

__all__ = ["filter_logits", "sample", "token_logprobs"]
