"""``mistral-jax-report`` (``python -m mistral_jax.report``): one self-contained HTML page about a training run.

    python -m mistral_jax.report WORKDIR [--out DIR]

WORKDIR (local, ``gs://`` or ``s3://``) is a run's workdir (it holds ``metrics.jsonl``); DIR (default
``WORKDIR/report/``, a bucket too) receives ``index.html``, the figures as ``.png`` files and ``report.json``
(the data plotted). Bad arguments, and a workdir without ``metrics.jsonl``, are one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mistral_jax import cli

PROG = "python -m mistral_jax.report"


def parser() -> cli.Parser:
    ap = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0], remote_ok=("workdir", "out"))
    ap.add_argument("workdir", help="the run's workdir (holds metrics.jsonl), local, gs:// or s3://")
    ap.add_argument("--out", default=None, help="where to write index.html, the PNGs and report.json "
                    "(default: WORKDIR/report/; local, gs:// or s3://)")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    return ap


def parse_args(argv: Sequence[str]):
    """The arguments, checked (schemes, buckets reachable) before anything is read."""
    from mistral_jax import storage

    args = parser().parse_args(list(argv))
    if not args.workdir:
        raise cli.UsageError("WORKDIR", args.workdir, "is empty", "pass the run's workdir")
    for flag, value in (("WORKDIR", args.workdir), ("--out", args.out)):
        if value is None:
            continue
        try:
            storage.check_supported(value, flag)
        except storage.UnsupportedPath as e:
            raise _usage(flag, value, e) from None
        cli.check_reachable(flag, value)
    if not storage.is_remote(args.workdir) and not storage.path(args.workdir).is_dir():
        raise cli.UsageError("WORKDIR", args.workdir, "is not a directory" if storage.path(args.workdir).exists()
                             else "does not exist", "pass the workdir a run was trained into (it holds "
                             "metrics.jsonl)")
    return args


def _usage(flag: str, value: str, err: Exception) -> cli.UsageError:
    out = cli.UsageError(flag, value, "", "")
    out.args = (str(err),)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; returns the exit status (0 written, 2 bad argument or no metrics.jsonl)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from mistral_jax import storage
    from mistral_jax.report import ReportError, build_report

    try:
        args = parse_args(argv)
        index = build_report(args.workdir, args.out)
    except (cli.UsageError, ReportError, storage.StorageError, storage.UnsupportedPath) as e:
        if cli.debug_enabled(argv):
            raise
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


def entry() -> None:
    """The console script: exit status 0 written, 2 bad argument or no metrics.jsonl."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
