"""What every command-line tool shares: one-line argument errors (exit 2), quiet libraries, a debug switch.

A tool validates its arguments before it loads anything slow, and reports a bad value with ``usage_error``::

    raise cli.UsageError("--top_p", 1.5, "must be in (0, 1]", "pass e.g. --top_p 0.9")
    # -> "generate: --top_p=1.5 must be in (0, 1]. Fix: pass e.g. --top_p 0.9"   (stderr, exit status 2)

``run(main, prog)`` calls ``main()`` and turns a ``UsageError`` (or any exception type listed in ``expected``)
into that single line and exit status 2; other exceptions keep their traceback. Setting ``MISTRAL_JAX_DEBUG=1``
(or passing ``--verbose`` to tools that define it) shows the traceback of expected errors too.

Also here, so every tool checks the same way: ``Parser`` (argparse, its errors as ``UsageError``),
``absl_flags_parser`` (the same for absl flags), ``number`` / ``check_dtype`` (flag values), ``check_reachable``
(a ``gs://`` / ``s3://`` path's endpoint, bucket and credentials, one line) and ``check_dir`` /
``check_checkpoint_dir`` / ``check_tokenizer`` (paths, read by name only, nothing loaded; the last two take bucket
paths).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

DEBUG_ENV = "MISTRAL_JAX_DEBUG"


class UsageError(ValueError):
    """A bad command-line value: which flag, which value, what is wrong and how to fix it."""

    def __init__(self, flag: str, value: Any, problem: str, fix: str):
        self.flag, self.value, self.problem, self.fix = flag, value, problem, fix
        shown = "(not given)" if value is None else f"{value!r}" if isinstance(value, str) else f"{value}"
        super().__init__(f"{flag}={shown} {problem}. Fix: {fix}")


def debug_enabled(argv: list[str] | None = None) -> bool:
    """True when tracebacks of expected errors should be shown (``MISTRAL_JAX_DEBUG=1`` or ``--verbose``)."""
    argv = sys.argv if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--verbose" in argv


def quiet_libraries() -> None:
    """Silence library chatter on the normal path: absl / Orbax INFO logs, metadata warnings, libtpu start-up."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
        absl_logging.set_stderrthreshold("error")
    except ImportError:  # absl is a core dependency; this only guards odd environments
        pass
    for name in ("absl", "orbax", "orbax.checkpoint", "jax._src.xla_bridge", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*[Mm]etadata file does not exist.*")
    from mistral_jax.distributed import skip_absent_tpu

    skip_absent_tpu()  # libtpu installed on a host without TPUs: no libtpu start-up chatter


def keep_host_memory(prog: str) -> None:
    """``host_memory.keep_freed_memory()`` before JAX starts (a bad ``MISTRAL_JAX_HOST_MALLOC`` is a one-line error,
    exit status 2): the tools that run XLA programs every step call it first thing."""
    from mistral_jax import host_memory

    run(host_memory.keep_freed_memory, prog, expected=(ValueError,))


def fail(prog: str, message: str, code: int = 2) -> None:
    """Print ``prog: message`` on stderr and exit with ``code`` (no traceback)."""
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def run(main: Callable[[], Any], prog: str, expected: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``main()``; a ``UsageError`` or an ``expected`` error becomes one line on stderr and exit status 2."""
    try:
        return main()
    except (UsageError, *expected) as e:
        if debug_enabled():
            raise
        fail(prog, str(e))


# ------------------------------------------------------------------------------------------ parsing
class ArgparseError(UsageError):
    """argparse's own complaint (unknown flag, bad choice, missing flag) as a one-line ``UsageError``."""

    def __init__(self, message: str, prog: str):
        flag = message[len("argument "):].split(":", 1)[0] if message.startswith("argument ") else "arguments"
        self.flag, self.value, self.problem, self.fix = flag, None, message, f"see {prog} --help"
        ValueError.__init__(self, f"{message}. Fix: see {prog} --help")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`ArgparseError` (one line, exit status 2 via :func:`run`),
    and which checks every path flag (``PATH_FLAGS``) with ``check_local_flags``: the flags named in
    ``remote_ok`` may be ``gs://`` / ``s3://`` paths, a URL in any other is refused before any work."""

    def __init__(self, *args, remote_ok: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.remote_ok = tuple(remote_ok)

    def error(self, message: str) -> NoReturn:
        raise ArgparseError(message, self.prog)

    def parse_known_args(self, args=None, namespace=None):  # parse_args calls it
        ns, rest = super().parse_known_args(args, namespace)
        check_local_flags({name: getattr(ns, name) for name in PATH_FLAGS if hasattr(ns, name)},
                          remote_ok=self.remote_ok)
        return ns, rest


# the flags that name files or directories, in every tool: a URL there is refused before any work
PATH_FLAGS = ("workdir", "checkpoint", "tokenizer", "input", "output", "output_path", "config", "include_path")


def check_local_flags(values: dict[str, Any], remote_ok: tuple[str, ...] = ()) -> None:
    """``{flag name: value}`` of path flags: a ``UsageError`` for the first value that is a URL the flag cannot
    take, which would otherwise be taken for a local directory. Flags in ``remote_ok`` take ``gs://`` / ``s3://``
    (``storage.check_supported``: other schemes, or a missing filesystem package, are refused); the others take
    local paths only (``storage.check_local``)."""
    from mistral_jax import storage

    for name, value in values.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            scheme = storage.url_scheme(v)
            if scheme is None:
                continue
            if name in remote_ok:
                try:
                    storage.check_supported(v, f"--{name}")
                except storage.UnsupportedPath as e:  # its message already names the flag, value and fix
                    raise _storage_usage_error(f"--{name}", v, e) from None
                continue
            raise UsageError(f"--{name}", v, f"is a {scheme}:// URL, which --{name} cannot take (a local path "
                             "only)", storage.FIX)


def _storage_usage_error(flag: str, value: Any, err: Exception) -> UsageError:
    """A ``UsageError`` whose line is a storage error's own (it already names the flag, the value and the fix)."""
    out = UsageError(flag, value, "", "")
    out.args = (str(err),)
    return out


def check_reachable(flag: str, value: Any, *, write: bool = False) -> None:
    """A ``gs://`` / ``s3://`` value: its endpoint answers, its bucket exists, credentials are found (and, with
    ``write``, an object can be written under it): ``storage.check_bucket``, fast, before anything loads. A
    ``UsageError`` with its one line otherwise (exit status 2 through ``run``). Local paths and None pass."""
    from mistral_jax import storage

    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None or storage.url_scheme(v) is None:
            continue
        try:
            storage.check_bucket(v, flag, write=write)
        except (storage.StorageError, storage.UnsupportedPath) as e:
            raise _storage_usage_error(flag, v, e) from None


def absl_flags_parser(prog: str, flag_values: Any) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run``: absl's own errors (an unknown flag, a value of the wrong type) as
    one line and exit status 2, like ``UsageError``."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        try:
            return flag_values(argv)
        except flags.Error as e:
            if debug_enabled(argv):
                raise
            m = re.match(r"flag --(\w+)=", str(e))
            kind = flag_values[m.group(1)].flag_type() if m and m.group(1) in flag_values else ""
            wanted = {"int": "an integer", "float": "a number"}.get(kind, "a valid value")
            fix = f"give --{m.group(1)} {wanted}" if m else f"check the flag names (`{prog} --helpfull` lists them)"
            fail(prog, f"{str(e).rstrip(' .?')}. Fix: {fix}")
            raise  # unreachable: fail exits

    return parse


# ------------------------------------------------------------------------------------------ argument checks
# Flag values first, then paths, before anything loads.
CHECKPOINT_KINDS = ("an HF dir (config.json + model.safetensors or model.safetensors.index.json + shards), a "
                    "Mistral consolidated dir (params.json + consolidated.safetensors) or a mistral_jax export dir / "
                    "training workdir (model_config.json + params/ or checkpoints/<step>/)")
DTYPES = ("float32", "bfloat16")  # model dtypes; conversion also writes float16


def number(flag: str, text: Any, kind: type, ok: Callable[[Any], bool], problem: str, fix: str) -> Any:
    """``text`` parsed as ``kind`` (int / float) and checked with ``ok``; a ``UsageError`` naming ``flag`` if not."""
    if text is None or isinstance(text, kind) and not isinstance(text, bool):
        value = text
    else:
        try:
            value = kind(str(text).strip())
        except ValueError:
            raise UsageError(flag, str(text), f"is not {'an integer' if kind is int else 'a number'}", fix) from None
    if value is not None and not math.isfinite(value):
        raise UsageError(flag, value, "is not a finite number", fix)
    if value is not None and not ok(value):
        raise UsageError(flag, value, problem, fix)
    return value


def check_dtype(flag: str, value: str | None, allowed: tuple[str, ...] = DTYPES) -> str | None:
    """None or one of ``allowed``."""
    if value is not None and value not in allowed:
        raise UsageError(flag, value, f"is not a supported dtype {list(allowed)}",
                         f"pass {flag} bfloat16 (half the memory) or {flag} float32, or omit it to keep the "
                         "stored dtype")
    return value


def check_checkpoint_dir(path: str | None, flag: str = "--checkpoint") -> str:
    """The format (``hf`` / ``mistral`` / ``jax``) of the checkpoint directory ``path`` (local or ``gs://`` /
    ``s3://``), read from its file names only; a bucket is checked first (``check_reachable``).

    Raises:
      UsageError: ``path`` is missing, not a directory, in an unreachable or missing bucket, or holds no checkpoint
        (says what one must contain).
    """
    from mistral_jax import storage

    if not path:
        raise UsageError(flag, None, "is required", f"pass {flag} DIR: {CHECKPOINT_KINDS}")
    check_reachable(flag, path)
    root = storage.path(path)
    if not root.exists():
        raise UsageError(flag, path, "does not exist", f"check the path; {flag} takes {CHECKPOINT_KINDS}")
    if not root.is_dir():
        raise UsageError(flag, path, "is a file, not a checkpoint directory",
                         f"pass the directory holding the checkpoint ({os.path.dirname(path) or '.'}?): "
                         f"{CHECKPOINT_KINDS}")
    from mistral_jax.convert import hf, mistral, native
    from mistral_jax.loading import formats_of

    def isfile(name: str) -> bool:
        return storage.path(storage.join(path, name)).is_file()

    found = formats_of(path)
    names = sorted(p.name for p in root.iterdir())
    listing = f"it holds {names[:8] + ['...'] if len(names) > 8 else names}"
    if not found:
        if isfile(native.MODEL_CONFIG):
            raise UsageError(flag, path, f"has {native.MODEL_CONFIG} but neither {native.PARAMS}/ nor "
                             f"{native.CHECKPOINTS}/<step>/{native.PARAMS}/ ({listing})",
                             "train until a checkpoint is written, or point at a mistral_jax export dir")
        raise UsageError(flag, path, f"is not a checkpoint directory ({listing})", f"pass {CHECKPOINT_KINDS}")
    fmt = found[0]
    weights = {"hf": (hf.SINGLE, hf.INDEX), "mistral": (mistral.WEIGHTS,)}.get(fmt, ())
    if weights and not any(isfile(w) for w in weights):
        marker = hf.CONFIG if fmt == "hf" else mistral.PARAMS
        torch_bin = any(n.endswith(".bin") for n in names)
        raise UsageError(flag, path, f"has {marker} but no weights ({' or '.join(weights)}; {listing})",
                         "re-save the PyTorch .bin weights as safetensors (transformers: save_pretrained("
                         "safe_serialization=True))" if torch_bin else
                         f"pass the directory holding the weights too: {CHECKPOINT_KINDS}")
    return fmt


def check_tokenizer(path: str | None, checkpoint: str, fmt: str, flag: str = "--tokenizer") -> str:
    """The tokenizer.model to use: ``path`` (a file, a directory holding tokenizer.model, each local or ``gs://`` /
    ``s3://``, or a named Mistral tokenizer such as ``mistral:v1``) or the checkpoint's."""
    from mistral_jax import storage
    from mistral_jax.data.tokenizer import Tokenizer, is_named, named_tokenizer_path, resolve

    if path is not None and is_named(path):
        try:
            return named_tokenizer_path(path)
        except ValueError as e:  # "<what is wrong>. Fix: <how>"
            problem, _, fix = str(e).partition(". Fix: ")
            raise UsageError(flag, path, f"cannot be used: {problem}", fix or "pass a tokenizer.model path") from None
    if path is not None:
        check_reachable(flag, path)
        file = resolve(path)  # a directory's tokenizer.model, else its tekken.json
        if not storage.path(file).is_file():
            raise UsageError(flag, path, "does not exist" if not storage.path(path).exists() else
                             f"is a directory without {Tokenizer.FILENAME} or {Tokenizer.TEKKEN_FILENAME}",
                             f"pass a sentencepiece {Tokenizer.FILENAME} or a tekken.json (or a directory "
                             "holding one), or a named tokenizer such as mistral:v3")
        return file
    from mistral_jax.loading import tokenizer_path

    found = tokenizer_path(checkpoint, fmt)
    if found is None:
        raise UsageError(flag, None, f"is needed: checkpoint {checkpoint!r} holds no {Tokenizer.FILENAME}",
                         f"pass {flag} PATH/{Tokenizer.FILENAME} (the tokenizer the model was trained with)")
    return found


def check_dir(flag: str, value: str, what: str) -> None:
    """``value`` must be an existing directory."""
    if not os.path.exists(value):
        raise UsageError(flag, value, "does not exist", f"pass {what}")
    if not os.path.isdir(value):
        raise UsageError(flag, value, "is not a directory", f"pass {what}")


# ------------------------------------------------------------------ tools that load a checkpoint (generate, serve)
def add_checkpoint_flags(ap: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--tokenizer``, ``--dtype`` and ``--verbose``, as every model-loading tool spells them."""
    ap.add_argument("--checkpoint", help="HF / Mistral / mistral_jax export dir or training workdir, local or "
                    "gs:// / s3:// (required)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer file or directory holding one (local or gs:// / "
                    "s3://), or a named Mistral tokenizer such as mistral:v3 (default: the checkpoint's tokenizer)")
    ap.add_argument("--dtype", default=None, help="parameter and compute dtype: float32 or bfloat16 "
                    "(default: as stored)")
    ap.add_argument("--kv_cache_dtype", default=None, help="the decoding KV cache: auto (the compute dtype) or int8 "
                    "(per-head scales: half the memory of bfloat16)")
    ap.add_argument("--quantize", default=None, help="weight-only quantization: int8 (per-channel scales: half the "
                    "weight memory of bfloat16; default: none)")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks of argument errors too")


def check_checkpoint_flags(args: argparse.Namespace) -> None:
    """The flag values of ``add_checkpoint_flags`` (no file opened)."""
    if args.checkpoint is None:
        raise UsageError("--checkpoint", None, "is required", f"pass --checkpoint DIR: {CHECKPOINT_KINDS}")
    check_dtype("--dtype", args.dtype)
    check_quantize_flags(args.quantize, args.kv_cache_dtype)


QUANTIZE_MODES = ("int8",)  # weight-only inference (--quantize of generate / serve / eval / aot --serve)
KV_CACHE_DTYPES = ("auto", "int8")  # --kv_cache_dtype (config.model.kv_cache_dtype)


def check_quantize_flags(quantize: str | None, kv_cache_dtype: str | None = None) -> None:
    """``--quantize`` and ``--kv_cache_dtype``: None or one of ``QUANTIZE_MODES`` / ``KV_CACHE_DTYPES`` (the one check
    of every command that takes them)."""
    if quantize not in (None, *QUANTIZE_MODES):
        raise UsageError("--quantize", quantize, "is not a weight quantization mode",
                         f"pass --quantize {' or '.join(QUANTIZE_MODES)} (per-channel int8 weights), or leave it out")
    if kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
        raise UsageError("--kv_cache_dtype", kv_cache_dtype, "is not a KV cache dtype",
                         f"pass --kv_cache_dtype {' or '.join(KV_CACHE_DTYPES)} (auto: the compute dtype), or leave "
                         "it out")


# the flags of add_checkpoint_flags that take gs:// / s3:// paths (Parser(remote_ok=...))
CHECKPOINT_REMOTE_OK = ("checkpoint", "tokenizer")


def check_checkpoint_paths(args: argparse.Namespace) -> str:
    """The checkpoint directory and tokenizer (files only, nothing loaded; buckets checked first); returns the
    tokenizer path or name."""
    fmt = check_checkpoint_dir(args.checkpoint)
    return check_tokenizer(args.tokenizer, args.checkpoint, fmt)


def load_checkpoint(args: argparse.Namespace, tokenizer_file: str, spec: Any = None) -> tuple[Any, Any]:
    """(tokenizer, model) of ``add_checkpoint_flags``' values; the tokenizer must fit the model's embeddings.

    ``spec``: the checkpoint resolved with ``training.run.resolve_checkpoint`` (its mesh and rules); default: the
    checkpoint on one device.
    """
    from mistral_jax.data.tokenizer import Tokenizer
    from mistral_jax.training.run import resolve_checkpoint

    try:
        tokenizer = Tokenizer(tokenizer_file)
    except ValueError as e:  # not a tokenizer file
        raise UsageError("--tokenizer", tokenizer_file, f"is not a valid tokenizer ({e})",
                         "pass the tokenizer the checkpoint was trained with") from e
    model = (spec or resolve_checkpoint(args.checkpoint, dtype=args.dtype,
                                        kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
                                        quantize=getattr(args, "quantize", None))).load()
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError("--tokenizer", tokenizer_file, f"has {tokenizer.vocab_size} pieces but the model only "
                         f"{model.cfg.vocab_size} embeddings", "pass the tokenizer the model was trained with")
    return tokenizer, model
