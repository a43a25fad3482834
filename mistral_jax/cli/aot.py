"""``python -m mistral_jax.aot --config configs/X.py --topology v5p-128 [--num_slices N] [--json]``: the AOT tool's
command line (the library is ``mistral_jax.aot``; see its docstring)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from mistral_jax.aot import (
    MeshConfigError,
    Topology,
    compile_train_step,
    format_report,
    parse_topology,
    topology_devices,
)

PROG = "aot"


def _topology_arg(name: str) -> Topology:
    """``--topology`` parsed, or a ``UsageError`` naming the flag."""
    from mistral_jax.cli import UsageError

    try:
        return parse_topology(name)
    except ValueError as e:
        problem, _, fix = str(e).partition(" Fix: ")
        raise UsageError("--topology", name, f"is not usable ({problem.rstrip('.')})", fix.rstrip(".")) from e


def _check_config_file(path: str) -> None:
    """``--config`` names an existing file (a ``file.py:arg`` suffix allowed), or a ``UsageError``."""
    from mistral_jax.cli import UsageError, check_local_flags

    check_local_flags({"config": path})
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
        raise UsageError("--config", path, "does not exist" if not os.path.exists(file) else "is not a file",
                         "pass a run config file such as --config configs/tiny.py (see configs/)")


def _config_arg(flag: Any) -> Any:
    """The loaded ``--config``, or a ``UsageError`` saying the file is missing or could not be loaded."""
    from ml_collections import config_flags

    from mistral_jax.cli import UsageError

    path = config_flags.get_config_filename(flag)
    _check_config_file(path)
    try:
        cfg = flag.value
        cfg.keys()  # a config that failed to load raises on first use
    except OSError as e:
        raise UsageError("--config", path, f"could not be loaded ({str(e).splitlines()[0]})",
                         "fix the config file: it must define get_config() returning a ConfigDict") from e
    return cfg


def main(argv: list[str]) -> None:
    """Check the flags (topology, then the config file), then compile; a bad value is one line, exit status 2."""
    from absl import flags

    from mistral_jax.cli import UsageError, quiet_libraries

    quiet_libraries()
    f = flags.FLAGS
    if len(argv) > 1:
        raise UsageError("positional arguments", " ".join(argv[1:]), "are not accepted",
                         "pass --config FILE, --topology NAME and --config.key=value overrides as flags")
    topo = _topology_arg(f.topology)
    if f.num_slices < 1:
        raise UsageError("--num_slices", f.num_slices, "must be at least 1",
                         "pass the number of TPU slices the job spans, e.g. --num_slices 2")
    run_cfg = _config_arg(f["config"])
    devices = topology_devices(topo, f.num_slices)
    report = compile_train_step(run_cfg, devices)
    report.update(hbm=topo.hbm_bytes, fits=report["fits"] is not False and report["total"] <= topo.hbm_bytes,
                  topology=topo.name,
                  libtpu_topology=topo.libtpu_name)
    slices = f" x {f.num_slices} slices" if f.num_slices > 1 else ""
    print(format_report(report, f"AOT train step for {topo.name}{slices} ({topo.libtpu_name})"))
    if f.json:
        print(json.dumps(report))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; its errors (unknown flag, bad value, an override naming no config field) as one line
    and exit status 2."""
    import re

    from absl import flags

    from mistral_jax import cli

    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl errors, and config_dict's for an override naming no field
        if cli.debug_enabled(argv):
            raise
        if not isinstance(e, flags.Error | AttributeError | KeyError | OSError):
            raise
        given = [argv[i + 1] if a == "--config" and i + 1 < len(argv) else a.partition("=")[2]
                 for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
        try:
            for path in given[-1:]:  # overrides on a config that did not load: name the file instead
                _check_config_file(path)
        except cli.UsageError as bad_config:
            cli.fail(PROG, str(bad_config))
        if isinstance(e, flags.Error):
            m = re.match(r"flag (--[\w.]+)=", str(e))
            fix = (f"pass a valid value for {m.group(1)} (`python -m mistral_jax.aot --helpfull` shows each flag)"
                   if m else "check the flag names (`python -m mistral_jax.aot --helpfull` lists them)")
            if m and m.group(1) == "--config":
                fix = "pass a run config file such as --config configs/tiny.py (see configs/)"
            cli.fail(PROG, f"{str(e).rstrip(' .?')}. Fix: {fix}")
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        key = str(e).strip("'\"")
        named = [o for o in overrides if key in o.split(".")] or overrides
        cli.fail(PROG, f"{', '.join(named) or '--config.KEY'} names no field of the run config ({key!r}). Fix: "
                       "check the field name against the config file (every field has a comment there)")
        raise  # unreachable: fail exits


def _run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from mistral_jax import cli

    config_flags.DEFINE_config_file("config", None, "run config file (configs/X.py)", lock_config=True)
    flags.DEFINE_string("topology", "v5p-128", "TPU topology: v5p-N, v4-N (TensorCores), v5e-N, v6e-N (chips), or "
                        "generation:grid (v5p:4x4x4)")
    flags.DEFINE_integer("num_slices", 1, "compile for this many copies of --topology joined over DCN (a multi-slice "
                         "job); the mesh gets mesh.dcn_data = num_slices unless the config sets its dcn_* axes")
    flags.DEFINE_bool("json", False, "also print the report as one JSON line")
    flags.DEFINE_bool("verbose", False, "show the traceback of argument errors too (as MISTRAL_JAX_DEBUG=1 does)")
    flags.mark_flags_as_required(["config"])
    if not jax.config.jax_platforms:  # compile for the TPU topology from this host's CPU; never grab a local TPU
        jax.config.update("jax_platforms", "cpu")
    from mistral_jax.training.recipe import ConfigError

    app.run(lambda argv: cli.run(lambda: main(argv), PROG, expected=(MeshConfigError, ConfigError)),
            flags_parser=_parse_flags)


def entry() -> None:
    """The command line (``python -m mistral_jax.aot``): one-line errors, exit status 2 for a bad value."""
    _run()


if __name__ == "__main__":
    entry()
