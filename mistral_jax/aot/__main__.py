"""``python -m mistral_jax.aot``: the AOT tool's command line (``mistral_jax.cli.aot``)."""

from mistral_jax.cli.aot import entry

entry()
