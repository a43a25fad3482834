"""``python -m mistral_jax.convert``: the ``mistral-jax-convert`` command (``mistral_jax.cli.convert``)."""

from mistral_jax.cli.convert import entry

entry()
