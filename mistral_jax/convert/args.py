"""Moved to ``mistral_jax.cli.export_args``; kept while ``lora``'s command line still imports it from here."""

from mistral_jax.cli.export_args import DTYPES, check_dtype, check_output, check_shard_size, run  # noqa: F401
