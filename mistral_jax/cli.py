"""What every command-line tool shares: one-line argument errors (exit 2), quiet libraries, a debug switch.

A tool validates its arguments before it loads anything slow, and reports a bad value with ``usage_error``::

    raise cli.UsageError("--top_p", 1.5, "must be in (0, 1]", "pass e.g. --top_p 0.9")
    # -> "generate: --top_p=1.5 must be in (0, 1]. Fix: pass e.g. --top_p 0.9"   (stderr, exit status 2)

``run(main, prog)`` calls ``main()`` and turns a ``UsageError`` (or any exception type listed in ``expected``)
into that single line and exit status 2; other exceptions keep their traceback. Setting ``MISTRAL_JAX_DEBUG=1``
(or passing ``--verbose`` to tools that define it) shows the traceback of expected errors too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

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
