"""``python -m mistral_jax.serve``: the ``mistral-jax-serve`` command (``mistral_jax.cli.serve``)."""

from mistral_jax.cli.serve import entry

entry()
