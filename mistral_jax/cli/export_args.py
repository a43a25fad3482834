"""Argument checking shared by the conversion / export command lines (``mistral-jax-convert``,
``mistral-jax-lora``).

Every bad value is found before anything is loaded and reported as one line naming the flag, the value and the
fix (``mistral_jax.cli.UsageError``), exit status 2; an error found while reading or writing a checkpoint is
one message (its own lines, e.g. the list of mismatched tensors) and exit status 1. Tracebacks only with
``MISTRAL_JAX_DEBUG=1`` or ``--verbose``.

Input and output directories may be ``gs://`` / ``s3://`` paths: their bucket is checked first (endpoint reachable,
bucket exists, credentials found; for an output, an object can be written there), and an input that is an
unfinished mistral_jax export is refused; each is one line, exit status 2, before any model is loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from mistral_jax import cli, storage
from mistral_jax.convert import files, paths

DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(flag: str, value: str | None) -> None:
    cli.check_dtype(flag, value, DTYPES)


def check_shard_size(flag: str, value: str) -> None:
    from mistral_jax.convert.writing import parse_size

    try:
        parse_size(int(value) if value.strip().isdigit() else value)
    except ValueError:
        raise cli.UsageError(flag, value, "is not a size > 0", "pass bytes or a size such as 5GB or 500MiB") from None


def _as_usage_error(flag: str, value: str, e: Exception) -> cli.UsageError:
    """A one-line error of the path layer (it already names the flag, the value and the fix) as a ``UsageError``."""
    err = cli.UsageError(flag, value, "", "")
    err.args = (str(e),)
    return err


def check_bucket(flag: str, value: str, *, write: bool = False) -> None:
    """``storage.check_bucket`` as a one-line ``UsageError`` on ``flag`` (nothing for a local path)."""
    try:
        storage.check_bucket(value, flag, write=write)
    except (storage.UnsupportedPath, storage.StorageError) as e:
        raise _as_usage_error(flag, value, e) from None


def check_input_dir(flag: str, value: str, what: str) -> None:
    """``value`` is an existing directory (local or on a bucket) and not an unfinished mistral_jax export."""
    check_bucket(flag, value)
    if not storage.is_remote(value):
        cli.check_dir(flag, value, what)
    elif not files.is_dir(value):
        raise cli.UsageError(flag, value, "does not exist" if not files.exists(value) else "is not a directory",
                             f"pass {what}")
    try:
        paths.check_complete(value, flag)
    except paths.IncompleteExportError as e:
        raise _as_usage_error(flag, value, e) from None


def check_output(flag: str, value: str, kind: str, overwrite: bool, inputs: Sequence[str]) -> None:
    """``paths.check_output`` as a one-line ``UsageError`` on ``flag`` (a bucket output must be writable)."""
    check_bucket(flag, value, write=True)
    try:
        paths.check_output(value, kind, overwrite, inputs)
    except (paths.OutputPathError, paths.OutputExistsError) as e:
        raise cli.UsageError(flag, value, e.problem.replace(f"output {value!r} ", ""),
                             e.fix.replace("pass overwrite=True (--overwrite)", "pass --overwrite")) from None
    except (storage.UnsupportedPath, storage.StorageError) as e:
        raise _as_usage_error(flag, value, e) from None


def run(prog: str, argv: Sequence[str], body: Callable[[], Any]) -> int:
    """Run ``body()``: 0 on success, 2 (one line) for a ``UsageError``, 1 for an error reading / writing a checkpoint.

    ``MISTRAL_JAX_DEBUG=1`` or ``--verbose`` in ``argv`` lets the exception (and its traceback) through.
    """
    debug = cli.debug_enabled(list(argv))
    try:
        body()
    except cli.UsageError as e:
        if debug:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError, ConversionError ...
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
