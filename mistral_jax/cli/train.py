"""``python train.py`` / ``mistral-jax-train``: ``--config configs/tiny.py --workdir runs/tiny [--config.a.b=v]``.

Resumes from ``{workdir}/checkpoints`` when present. The workdir may be a bucket (``--workdir gs://bucket/run`` or
``s3://bucket/run``): everything the run writes lives there (a local working copy of the metrics in
``$MISTRAL_JAX_CACHE``), and a bucket that does not exist or does not answer is one line before any work.
On SIGTERM / SIGINT it saves and exits with 128 + signal.
Several processes (a TPU slice, SLURM, Open MPI, or the ``MISTRAL_JAX_*`` variables of ``mistral_jax.distributed``)
run the same command; ``jax.distributed`` starts after the argument checks, before any device is used.
The run config is resolved once (``mistral_jax.training.run.resolve``: model config for this host's platform, mesh,
rules, optimizer, recipe, ``init_from``), as the AOT tool resolves it for a TPU topology.
``--dry_run`` compiles the train step on the real devices (``aot.compile_run``, the AOT tool's compile), prints
memory per device and FLOPs, and writes nothing.
The log is quiet: a few plain lines (FLOPs and peak, a resume, warnings) and the summary; ``--verbose`` adds the
run's set-up (recipe, mesh, sharding rules, platform) on stderr.
A bad argument or config value is one line naming it, its value and the fix (exit status 2), checked before anything
is loaded; a run that fails (a checkpoint save, a non-finite loss) is one line too (exit status 1). Tracebacks only
with ``MISTRAL_JAX_DEBUG=1`` or ``--verbose``. The last line is a summary: status, step, final loss, newest checkpoint.
"""

import logging
import os
import re
import sys

from mistral_jax import cli, storage

PROG = "train"
_FLAGS: dict = {}  # the absl flag holders, defined by ``entry`` (not at import: importing defines no flags)


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}":
            return argv[i + 1] if i + 1 < len(argv) else ""
    return None


def check_args(argv: list[str]) -> None:
    """The checks that need nothing loaded: required flags, the config file, the workdir, override names."""
    from mistral_jax.training import run

    if "--helpfull" in argv:
        return  # absl lists every flag, config fields included
    if {"-h", "--help", "--helpshort"} & set(argv):
        print("usage: train.py --config FILE --workdir DIR [--config.a.b=value ...] [--dry_run] [--verbose]\n\n"
              + __doc__ + "\n--helpfull lists every flag, the config's fields included.")
        sys.exit(0)
    config = _flag_value(argv, "config")
    if not config:
        raise cli.UsageError("--config", config, "is required", "pass --config configs/tiny.py (or another config)")
    # --workdir may be gs:// or s3:// (another scheme is refused); --config is a local file
    cli.check_local_flags({"config": config, "workdir": _flag_value(argv, "workdir")}, remote_ok=("workdir",))
    path = config.split(":")[0]
    if not os.path.isfile(path):
        names = sorted(n for n in os.listdir(run.CONFIG_DIR) if n.endswith(".py") and not n.startswith("_"))
        raise cli.UsageError("--config", config, "does not exist", f"pass one of configs/{{{','.join(names)}}}")
    # a config file imports its siblings as ``configs.*``: the directory above its folder goes on the path
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    workdir = _flag_value(argv, "workdir")
    if not workdir:
        raise cli.UsageError("--workdir", workdir, "is required",
                             "pass --workdir DIR (a new directory, or a run's workdir to resume it)")
    if storage.url_scheme(workdir) is None and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise cli.UsageError("--workdir", workdir, "is a file", "pass a directory (a new one, or a run's workdir)")
    run.check_cli_overrides(argv)


def main(argv: list[str]) -> None:
    import jax

    from mistral_jax import distributed
    from mistral_jax.data import loader, prepared
    from mistral_jax.training import checkpoint, run, trainer
    from mistral_jax.training.hooks import StopRun

    cli.quiet_libraries()  # again: absl's flag parsing resets the verbosity (Orbax logs every save at INFO)
    _plain_logs(logging.DEBUG if cli.debug_enabled() else logging.INFO)
    cfg, workdir = _FLAGS["config"].value, _FLAGS["workdir"].value
    try:
        run.check_storage(cfg, workdir)  # the buckets answer (workdir writable) before any device or download
        run.check_data(cfg)  # prepared datasets and the mixture fit the run (manifests, shards), before any device
        run.check_processes(cfg, workdir, distributed.expected_process_count())  # before any device
        distributed.initialize()
        spec = run.resolve(cfg)  # the run, resolved once: mesh, rules, model config, optimizer, init_from
        if _FLAGS["dry_run"].value:
            from mistral_jax.aot.dry_run import dry_run, format_dry_run

            report = format_dry_run(dry_run(spec, workdir))
            return print(report, flush=True) if jax.process_index() == 0 else None
        result = trainer.train(spec, workdir)
    except (run.ConfigError, checkpoint.WorkdirBusy, storage.StorageError, ValueError) as e:
        if cli.debug_enabled():
            raise
        # their message names the field (or flag), the value and the fix
        named = isinstance(e, (run.ConfigError, checkpoint.WorkdirBusy, storage.StorageError, storage.UnsupportedPath,
                               prepared.PreparedError, loader.MixtureError, loader.MixtureChanged))
        cli.fail(PROG, str(e) if named else f"{type(e).__name__}: {e}", 2)
    except (checkpoint.CheckpointSaveError, FloatingPointError, distributed.DistributedStartError, StopRun) as e:
        if cli.debug_enabled():
            raise
        cli.fail(PROG, f"{type(e).__name__}: {e}", 1)
    except jax.errors.JaxRuntimeError as e:
        if cli.debug_enabled() or jax.process_count() == 1:
            raise
        cli.fail(PROG, f"process {jax.process_index()}: a step across the {jax.process_count()} processes failed, "
                 f"most likely because another process died (see its log): {str(e).splitlines()[0][:300]}", 1)
    loss = result["last_metrics"].get("loss")
    if (loss is None and jax.process_index() == 0
            and storage.path(storage.join(workdir, "metrics.jsonl")).is_file()):
        # a complete run, rerun: its last logged loss
        from mistral_jax.training.metrics import read_metrics

        logged = [r["loss"] for r in read_metrics(workdir) if "loss" in r and r.get("step", 0) <= result["step"]]
        loss = logged[-1] if logged else None
    how = result["status"] if result["status"] == "done" else f"preempted by signal {result['signal']}"
    if jax.process_index() == 0:
        print(f"{PROG}: {how} at step {result['step']}/{cfg.num_steps}; final loss "
              f"{'n/a' if loss is None else f'{loss:.4f}'}; newest checkpoint {result['checkpoint'] or 'none'}"
              + (f"; {result['goodput']}" if result.get("goodput") else ""), flush=True)
    if result["status"] == "preempted":
        sys.exit(128 + result["signal"])


def _plain_logs(level: int) -> None:
    """The package's log lines as plain text on stderr, without the glog header (``I1205 12:00:00.1 123
    trainer.py:430]``) absl's handler gives them; ``level`` DEBUG (``--verbose``) adds the run's set-up (recipe, mesh,
    sharding rules, platform)."""
    log = logging.getLogger("mistral_jax")
    log.setLevel(level)
    if not any(getattr(h, "mistral_jax_plain", False) for h in log.handlers):
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.mistral_jax_plain = True
        log.addHandler(handler)
    log.propagate = False  # not again through absl's handler on the root logger


def _parse_flags(argv: list[str]) -> list[str]:
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        m = re.match(r"flag --([\w.]+)=(.*?): (.*)", str(e), re.S)
        flag, value, problem = m.groups() if m else ("flags", None, str(e))
        problem = " ".join(problem.split())
        cli.fail(PROG, f"--{flag}={value}: {problem}. Fix: pass a value of the field's type (see the config file)."
                 if m else f"{problem}. Fix: see python train.py --help.", 2)
    if len(rest) > 1:
        cli.fail(PROG, f"unexpected arguments {rest[1:]}. Fix: pass flags only; config overrides are "
                 "--config.a.b=value.", 2)
    return rest


def entry() -> None:
    """The command line (``python train.py`` / ``mistral-jax-train``): checks before anything loads, then absl."""
    cli.quiet_libraries()
    cli.keep_host_memory(PROG)
    cli.run(lambda: check_args(sys.argv[1:]), PROG, expected=(ValueError,))
    from absl import app, flags
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)",
                                                       lock_config=True)
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, tokenizer)")
    _FLAGS["dry_run"] = flags.DEFINE_bool("dry_run", False, "compile the step, print memory and FLOPs; no training")
    flags.DEFINE_bool("verbose", False, f"show tracebacks of expected errors (as {cli.DEBUG_ENV}=1)")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
