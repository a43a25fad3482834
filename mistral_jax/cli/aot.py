"""``python -m mistral_jax.aot --config configs/X.py --topology v5p-128 [--num_slices N] [--json]``: the AOT tool's
command line (the library is ``mistral_jax.aot``; see its docstring).

``--serve`` checks a serving configuration instead of the train step: ``config.model`` served at ``--dtype`` with
``--max_batch`` decode slots up to ``--max_len`` positions on ``--mesh`` (``mistral_jax.aot.serving``)::

    python -m mistral_jax.aot --config configs/mistral_7b.py --topology v5e-8 --serve --mesh tensor=8 \\
        --max_batch 64 --max_len 32768 --prefix_cache_mb 1024
"""

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
# only with --serve
SERVE_FLAGS = ("mesh", "max_batch", "max_len", "prefix_cache_mb", "dtype", "chunk_size", "quantize")


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
    if topo.platform == "gpu":
        from mistral_jax.aot import gpu

        if not gpu.cuda_plugin_available():
            raise UsageError("--topology", topo.name, "needs JAX's CUDA plugin to compile for GPUs, and it is not "
                             "installed", f"pip install 'jax[cuda12]=={jax.__version__}' (no GPU or driver needed)")
    if topo.platform == "gpu" and f.num_slices > 1:
        raise UsageError("--num_slices", f.num_slices, f"counts TPU slices, not nodes of {topo.name}",
                         f"name the nodes in the topology: --topology {f.num_slices}x{topo.name}")
    given = [name for name in SERVE_FLAGS if f[name].present]
    if given and not f.serve:
        raise UsageError(f"--{given[0]}", f[given[0]].value, "only applies to a serving check",
                         f"add --serve (or drop --{given[0]} to compile the train step)")
    serve_args = _serve_args(f, topo) if f.serve else None
    run_cfg = _config_arg(f["config"])
    if serve_args is not None:
        _serve(run_cfg, topo, *serve_args, as_json=f.json)
        return
    devices = topology_devices(topo, f.num_slices)
    report = compile_train_step(run_cfg, devices)
    others = report.get("programs") or {}  # an RL recipe's rollouts, with the train state resident
    report.update(hbm=topo.hbm_bytes, fits=report["fits"] is not False and report["total"] <= topo.hbm_bytes
                  and all(p["fits"] is not False and p["with_state"] <= topo.hbm_bytes for p in others.values()),
                  topology=topo.name,
                  libtpu_topology=topo.libtpu_name)
    slices = f" x {f.num_slices} slices" if f.num_slices > 1 else ""
    print(format_report(report, f"AOT train step for {topo.name}{slices} ({topo.libtpu_name})"))
    if f.json:
        print(json.dumps(report))


def _serve_args(f: Any, topo: Topology) -> tuple[Any, ...]:
    """The serving flags, checked (``UsageError``): ``(mesh sizes or None, max_batch, max_len, prefix MiB, dtype,
    chunk_size, quantize)``."""
    from mistral_jax.cli import DTYPES, UsageError, check_quantize_flags, number
    from mistral_jax.cli.serve import parse_mesh

    if f.num_slices != 1:
        raise UsageError("--num_slices", f.num_slices, "is not supported with --serve (a server runs on one slice)",
                         "drop --num_slices")
    max_batch = number("--max_batch", f.max_batch, int, lambda v: v >= 1, "must be at least 1",
                       "pass the decode slots (requests decoded together), e.g. --max_batch 64")
    max_len = number("--max_len", f.max_len, int, lambda v: v >= 1, "must be at least 1",
                     "pass the positions a request may reach (prompt + new tokens), e.g. --max_len 32768, or omit "
                     "it (the model's max_seq_len)")
    prefix = number("--prefix_cache_mb", f.prefix_cache_mb, float, lambda v: v >= 0, "must be >= 0",
                    "pass the prefix cache's budget in MiB, e.g. --prefix_cache_mb 1024, or 0 for none")
    chunk = number("--chunk_size", f.chunk_size, int, lambda v: v >= 1, "must be at least 1",
                   "pass a positive prefill chunk such as --chunk_size 512, or omit it (the window)")
    dtype = f.dtype or "bfloat16"
    if dtype not in DTYPES:
        raise UsageError("--dtype", dtype, f"is not a serving dtype {list(DTYPES)}",
                         "pass --dtype bfloat16 (the default: half the memory) or --dtype float32")
    check_quantize_flags(f.quantize)
    mesh = parse_mesh(f.mesh)
    if mesh is not None:
        from mistral_jax import sharding

        try:
            sharding.mesh_shape(mesh, topo.chips)
        except ValueError as e:
            raise UsageError("--mesh", f.mesh, f"does not lay out the {topo.chips} chips of {topo.name} "
                             f"({str(e).split(' Fix: ')[0].rstrip('.')})",
                             f"make the sizes multiply to {topo.chips}, or use -1 for one axis") from None
    return mesh, max_batch, max_len, prefix, dtype, chunk, f.quantize


def _serve(run_cfg: Any, topo: Topology, mesh: dict[str, int] | None, max_batch: int, max_len: int | None,
           prefix_mb: float, dtype: str, chunk: int | None, quantize: str | None, as_json: bool) -> None:
    """Plan the serving check (one-line ``ServingConfigError`` before anything compiles), compile, print; exit status
    2 with one line when it does not fit."""
    from mistral_jax import cli
    from mistral_jax.aot import serving
    from mistral_jax.training.run import model_config_of

    model_cfg = model_config_of(run_cfg)
    # --mesh: the rules the server picks for it (auto); else the run config's mesh and rules
    mesh_cfg = mesh if mesh is not None else run_cfg.mesh.to_dict()
    plan = serving.plan_serving(model_cfg, mesh_cfg, topo.chips, max_batch=max_batch, max_len=max_len, dtype=dtype,
                                prefix_cache_mb=prefix_mb, chunk_size=chunk, platform="tpu")
    report = serving.compile_serving(plan, topology_devices(topo), topo.hbm_bytes, quantize=quantize)
    report.update(topology=topo.name, libtpu_topology=topo.libtpu_name, preset=run_cfg.model.get("preset", ""))
    print(serving.format_serving_report(report, f"AOT serving {report['preset'] or 'model'} for {topo.name} "
                                                f"({topo.libtpu_name})"))
    if as_json:
        print(json.dumps(report))
    if not report["fits"]:
        largest = max(report["decode"]["total"], report["prefill"]["total"])
        cli.fail(PROG, f"serving does not fit: {report['total'] / serving.GiB:.2f} GiB per chip (the larger program "
                       f"{largest / serving.GiB:.2f} GiB + prefix cache {report['prefix_cache'] / serving.GiB:.2f} "
                       f"GiB) over the {topo.hbm_bytes / serving.GiB:.0f} GiB of a {topo.generation} chip. Fix: lower "
                       "--max_batch or --prefix_cache_mb, or use more chips (a larger --topology)")


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
                        "generation:grid (v5p:4x4x4); GPU nodes (the jax[cuda12] plugin, no GPU needed): h100-8, "
                        "h200-8, 2xh100-8")
    flags.DEFINE_integer("num_slices", 1, "compile for this many copies of --topology joined over DCN (a multi-slice "
                         "job); the mesh gets mesh.dcn_data = num_slices unless the config sets its dcn_* axes")
    flags.DEFINE_bool("json", False, "also print the report as one JSON line")
    flags.DEFINE_bool("serve", False, "check a serving configuration instead of the train step: compile the server's "
                      "decode loop and prefill chunk for config.model (mistral_jax.aot.serving)")
    flags.DEFINE_string("mesh", None, "--serve: mesh axis sizes such as 'tensor=8' or 'data=2,tensor=4' (axes data, "
                        "fsdp, tensor, expert; one may be -1; the rules the server picks for it); default config.mesh")
    flags.DEFINE_integer("max_batch", 16, "--serve: decode slots B (requests decoded together)")
    flags.DEFINE_integer("max_len", None, "--serve: positions a request may reach (prompt + new tokens); the cache "
                         "holds the sliding window W per row, else max_len; default the model's max_seq_len")
    flags.DEFINE_float("prefix_cache_mb", 1024.0, "--serve: prefix-cache budget in MiB, as mistral-jax-serve's (0: "
                       "off; row snapshots, each split over the tensor ways, a copy per batch shard)")
    flags.DEFINE_string("dtype", None, "--serve: weights and compute dtype, bfloat16 (default) or float32")
    flags.DEFINE_integer("chunk_size", None, "--serve: prefill chunk (default: the window W, else 4096; at most the "
                         "cache slots)")
    flags.DEFINE_string("quantize", None, "--serve: weight-only quantization as mistral-jax-serve's: int8 (per-channel "
                        "scales); the int8 KV cache is --config.model.kv_cache_dtype=int8")
    flags.DEFINE_bool("verbose", False, "show the traceback of argument errors too (as MISTRAL_JAX_DEBUG=1 does)")
    flags.mark_flags_as_required(["config"])
    if not jax.config.jax_platforms:  # compile for the topology from this host's CPU; never grab a local TPU / GPU
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # a CUDA plugin without a driver: compile only
    from mistral_jax.aot.serving import ServingConfigError
    from mistral_jax.training.recipe import ConfigError

    app.run(lambda argv: cli.run(lambda: main(argv), PROG, expected=(MeshConfigError, ConfigError, ServingConfigError)),
            flags_parser=_parse_flags)


def entry() -> None:
    """The command line (``python -m mistral_jax.aot``): one-line errors, exit status 2 for a bad value."""
    _run()


if __name__ == "__main__":
    entry()
