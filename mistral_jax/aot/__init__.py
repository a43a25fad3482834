"""Ahead-of-time proof of fit: compile the real train step for a TPU topology from a CPU machine.

    python -m mistral_jax.aot --config configs/mixtral_8x7b.py --topology v5p-128 [--config.key=value ...]
    python -m mistral_jax.aot --config configs/mixtral_8x7b.py --topology v5p-128 --num_slices 2   # multi-slice

Needs libtpu (the ``tpu`` extra: ``pip install "jax[tpu]"``), which compiles for TPU topologies without TPU
hardware. The run config is resolved as ``train.py`` resolves it (``training.run.resolve``) on the topology's
devices, so the model's ``auto`` backends resolve for the TPU (``ModelConfig.platform = "tpu"``) and the program
is the run's recipe: its train state holds what the recipe trains (e.g. only adapters, with the base frozen) and
the optimizer state covers only that, and its step minimises the recipe's objective on the recipe's batches.
The step is ``training.step.jit_train_step`` on that state, mesh
(``config.mesh``, -1 = fill the topology's chips), rules, batch and remat, lowered on abstract (sharded) state
and batch; nothing is read but ``init_from``'s config file (when it is a directory here; else ``config.model``'s
architecture is compiled). Prints the per-chip memory of the compiled program (arguments, outputs,
temporaries, total vs HBM; the train state's params, frozen weights and optimizer state), FLOPs per step,
whether it fits, the bytes each collective kind moves per step and the bytes read from and written to HBM per step
(both read from the optimized HLO, loops counted by their trip counts: ``aot.hlo``) and a roofline step-time
estimate from compute, HBM and collective terms with the MFU it implies (``aot.roofline``).

Topologies: ``v5p-N`` / ``v4-N`` (N TensorCores, 2 per chip), ``v5e-N`` / ``v6e-N`` (N chips), or an explicit
``v5p:4x4x4``-style chip grid. ``--num_slices N`` compiles for N such slices joined by the data-center network
(DCN): the devices carry their ``slice_index`` and the mesh puts ``mesh.dcn_data = N`` (unless the config sets
``mesh.dcn_data`` / ``mesh.dcn_fsdp``), so data parallelism spans the slices and memory per chip is one slice's.

Serving (``--serve``, ``aot.serving``): the server's decode step and prefill chunk for ``config.model`` on a mesh,
with its KV cache and a prefix-cache budget, per chip against HBM (``serving.plan_serving``, ``compile_serving``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax

from mistral_jax import sharding
from mistral_jax.aot import hlo, roofline
from mistral_jax.training.run import MeshConfigError

__all__ = ["MeshConfigError", "Topology", "compile_run", "compile_train_step", "format_report", "libtpu_available",
           "memory_report", "parse_topology", "state_bytes", "topology_devices"]

GiB = 1024**3

# HBM per chip (bytes) and the chip grids of the common slice sizes.
_HBM = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (generation, chip grid: the ``libtpu`` topology name, HBM per chip) or GPU nodes (``platform``
    gpu: the GPU model, JAX's CUDA topology ``1 x nodes x GPUs per node``, memory per GPU; ``aot.gpu``)."""

    name: str  # as given, e.g. v5p-128, h100-8
    generation: str  # v4 | v5e | v5p | v6e | h100 | h200
    grid: str  # e.g. 4x4x4; GPUs: 1xNODESxGPUS
    hbm_bytes: int
    platform: str = "tpu"

    @property
    def chips(self) -> int:
        return math.prod(int(x) for x in self.grid.split("x"))

    @property
    def libtpu_name(self) -> str:
        """The compiler's name of the topology: ``v5p:4x4x4``; GPUs ``cuda:1x1x8``."""
        return f"cuda:{self.grid}" if self.platform == "gpu" else f"{self.generation}:{self.grid}"


def parse_topology(name: str) -> Topology:
    """``v5p-128`` / ``v6e-256`` / ``v5p:4x4x4``, or GPU nodes ``h100-8`` / ``h200-8`` / ``2xh100-8`` ->
    ``Topology``; raises listing the accepted forms."""
    from mistral_jax.aot import gpu

    if gpu.is_gpu_topology(name):
        g = gpu.parse(name)
        return Topology(name=name, generation=g.gpu, grid=g.topology, hbm_bytes=g.hbm_bytes, platform="gpu")
    gen, sep, rest = name.replace(":", "-", 1).partition("-")
    gen = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}.get(gen, gen)
    if gen not in _HBM or not sep or not rest:
        raise ValueError(f"unknown TPU topology {name!r}. Fix: use v4-N, v5p-N (N TensorCores, 2 per chip), "
                         f"v5e-N, v6e-N (N chips) or generation:grid such as v5p:4x4x4; GPU nodes: h100-8, "
                         f"h200-8, 2xh100-8.")
    if "x" in rest:
        grid = rest
        if not all(x.isdigit() and int(x) > 0 for x in grid.split("x")):
            raise ValueError(f"bad chip grid {grid!r} in TPU topology {name!r}. Fix: give positive chip counts per "
                             f"axis, e.g. {gen}:4x4x4.")
    elif not rest.isdigit():
        raise ValueError(f"TPU topology {name!r} has no core / chip count. Fix: use {gen}-N with a number N, e.g. "
                         f"{gen}-8, or a grid such as {gen}:2x2x1.")
    else:
        n = int(rest)
        chips = n // _CORES_PER_CHIP[gen]
        grids = _GRIDS_3D if gen in ("v4", "v5p") else _GRIDS_2D
        if n % _CORES_PER_CHIP[gen] or chips not in grids:
            raise ValueError(f"no known chip grid for {name!r} ({chips} chips). Fix: give the grid explicitly, "
                             f"e.g. {gen}:{next(iter(grids.values()))}, or use one of "
                             f"{[f'{gen}-{c * _CORES_PER_CHIP[gen]}' for c in grids]}.")
        grid = grids[chips]
    return Topology(name=name, generation=gen, grid=grid, hbm_bytes=_HBM[gen])


def topology_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of ``num_slices`` copies of ``topology`` (needs libtpu; no TPU hardware).

    With ``num_slices > 1`` each device carries the ``slice_index`` of its slice, as on a multi-slice job.
    """
    from jax.experimental import topologies

    if topology.platform == "gpu":
        from mistral_jax.aot import gpu

        if num_slices > 1:
            raise ValueError(f"--num_slices applies to TPU slices; for {num_slices} GPU nodes name them in the "
                             f"topology. Fix: --topology {num_slices}x{topology.name}.")
        return gpu.devices(gpu.parse(topology.name))
    # Compiling needs no TPU, so several compiling processes may share libtpu (else: a lockfile error).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chatter: list[str] = []
    try:
        with _captured_stderr(chatter):  # libtpu's start-up lines about the absent TPU host (metadata, hostnames)
            desc = topologies.get_topology_desc(topology.libtpu_name, "tpu",
                                                **({"num_slices": num_slices} if num_slices > 1 else {}))
    except Exception as e:  # noqa: BLE001 - missing libtpu surfaces as various errors
        said = " | ".join(line for line in "".join(chatter).splitlines()[-3:] if line.strip())
        raise RuntimeError(f"cannot describe TPU topology {topology.libtpu_name!r}: {type(e).__name__}: {e}"
                           f"{f' (libtpu: {said})' if said else ''}. Fix: install the tpu extra (pip install "
                           "'mistral_jax[tpu]' or 'jax[tpu]') of the same jax version; for a libtpu lockfile error "
                           "set ALLOW_MULTIPLE_LIBTPU_LOAD=1.") from e
    return list(desc.devices)


@contextlib.contextmanager
def _captured_stderr(into: list[str]) -> Iterator[None]:
    """File descriptor 2 goes to a temporary file for the block (C++ libraries write there, past ``sys.stderr``);
    its text is appended to ``into``, not shown."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            into.append(tmp.read().decode("utf-8", "replace"))


def libtpu_available() -> bool:
    """True if libtpu can be imported (AOT compilation for TPU topologies is possible)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def memory_report(compiled: Any, hbm_bytes: int | None = None) -> dict[str, Any]:
    """Per-device memory and FLOPs of a compiled program (``jax.jit(...).lower(...).compile()``).

    Args:
      compiled: the compiled executable.
      hbm_bytes: device memory to compare against (None: report without a verdict).

    Returns:
      Bytes of ``arguments``, ``outputs``, ``aliased`` (donated outputs reusing argument buffers), ``temps``,
      ``code``, ``total`` (= arguments + outputs - aliased + temps + code: the peak the program needs), and
      ``flops`` (per device, from XLA's cost analysis, which counts a while-loop body once: with scanned layers
      or gradient accumulation use ``mistral_jax.flops.flops_per_step``), ``hbm`` and ``fits`` (``total <= hbm``), and
      ``host_temps``: host memory per device the program uses for temporaries (``remat="offload"`` keeps each
      layer's input there; not part of ``total``).
    """
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend gives no memory analysis for compiled programs; use a CPU or TPU compile.")
    args, outs = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temps = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    code = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
    total = args + outs - alias + temps + code
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float((cost or {}).get("flops", float("nan")))
    host_temps = int(getattr(ma, "host_temp_size_in_bytes", 0) or 0)
    return dict(arguments=args, outputs=outs, aliased=alias, temps=temps, code=code, total=total, flops=flops,
                hbm=hbm_bytes, fits=None if hbm_bytes is None else total <= hbm_bytes, host_temps=host_temps)


def _oom_report(err: Exception) -> dict[str, Any]:
    """The TPU compiler rejects a program that cannot fit: report its stated requirement instead of a crash."""
    import re

    msg = str(err)
    m = re.search(r"memory required for HLO temporaries \(([\d.]+)([GMK])\)", msg) or re.search(
        r"Used ([\d.]+)([GMK]) of [\d.]+[GMK] hbm", msg)
    if "RESOURCE_EXHAUSTED" not in msg or m is None:
        raise err
    scale = {"G": GiB, "M": 1024**2, "K": 1024}[m.group(2)]
    need = int(float(m.group(1)) * scale)
    return dict(arguments=0, outputs=0, aliased=0, temps=need, code=0, total=need, flops=float("nan"), hbm=None,
                fits=False, compiler_error=msg.splitlines()[0][:300], collectives=None,
                collective_loops_counted_once=[], hbm_bytes=None)


def state_bytes(abstract_state: dict[str, Any]) -> dict[str, int]:
    """Bytes per device of each part of an abstract train state (``ShapeDtypeStruct``s carrying shardings)."""
    def per_device(x: Any) -> int:
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        return math.prod(shape) * x.dtype.itemsize

    return {k: sum(per_device(x) for x in jax.tree.leaves(abstract_state[k])) for k in ("params", "frozen",
                                                                                         "opt_state")}


def compile_run(run: Any) -> dict[str, Any]:
    """Lower and compile the train step of a resolved run (``training.run.resolve``) on abstract inputs.

    The train state, the optimizer, the mesh and rules and the batch are the run's (nothing is built again); the
    same report serves the AOT tool and ``train.py --dry_run``.

    Returns:
      ``memory_report``'s dict (bytes per device; a compiler out-of-memory error becomes a "does not fit" report)
      plus ``collectives`` (``hlo.collective_traffic``: ``{kind: {count, bytes}}`` per device and step; None when
      the compiler refused the program), ``hbm_bytes`` (``hlo.hbm_traffic``: bytes per device and step read from
      and written to HBM; None likewise) and ``collective_loops_counted_once`` (while loops of unknown trip count,
      counted once in both figures), ``recipe``, ``trainable_params`` / ``frozen_params`` (counts), ``state``
      (bytes per device of the train state's ``params``, ``frozen`` and ``opt_state``), ``mesh``, ``rules``,
      ``devices``, ``compile_s``, ``model_flops_per_step`` (``run.flops_per_step``: ``mistral_jax.flops``, all
      devices), ``model_flops_per_chip`` and ``roofline`` (``roofline.estimate``: the step-time lower bound and the
      MFU it implies, for TPU devices of a known generation; None otherwise).
    """
    from mistral_jax.training import step as step_lib

    cfg, mesh, rules, recipe, data = run.cfg, run.mesh, run.rules, run.recipe, run.data
    t0 = time.perf_counter()
    objective = recipe.objective
    graphdef, state, shardings = step_lib.state_layout(recipe.abstract_model(run.model_cfg), run.tx, mesh, rules,
                                                       recipe.trainable, keep_initial=objective.keeps_initial)
    batch = step_lib.abstract_batch(data.batch_size, data.seq_len, mesh, rules, objective)
    fn = step_lib.jit_train_step(graphdef, run.tx, shardings, mesh, rules, grad_accum_steps=data.grad_accum_steps,
                                 schedule=run.schedule, objective=objective)
    with sharding.use_mesh(mesh, rules):
        lowered = fn.lower(state, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that exceed HBM
            report = _oom_report(e)
        else:
            report = memory_report(compiled)
            text = compiled.as_text()
            traffic = hlo.collective_traffic(text)
            report.update(collectives=traffic.kinds, collective_loops_counted_once=traffic.uncounted_loops,
                          hbm_bytes=hlo.hbm_traffic(text).bytes)
            report["attention"] = _attention_exchange(run, text)
            report["dot_types"] = hlo.dot_operand_types(text)
        extras = {}
        for name, (lower, resident, parts) in recipe.aot_programs(run, graphdef, state).items():
            t1 = time.perf_counter()
            try:
                r = memory_report(lower().compile())
            except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that exceed HBM
                r = _oom_report(e)
            r.update(resident=resident, parts=parts, with_state=r["total"] + resident,
                     compile_s=round(time.perf_counter() - t1, 1))
            extras[name] = r
    model_flops = run.flops_per_step
    report.update(programs=extras, recipe=recipe.name,
                  trainable_params=sum(x.size for x in jax.tree.leaves(state["params"])),
                  frozen_params=sum(x.size for x in jax.tree.leaves(state["frozen"])), state=state_bytes(state),
                  mesh={k: int(v) for k, v in mesh.shape.items()}, rules=cfg.mesh.get("rules", "auto"),
                  devices=mesh.size, compile_s=round(time.perf_counter() - t0, 1),
                  model_flops_per_step=model_flops, model_flops_per_chip=model_flops / mesh.size)
    generation = roofline.generation_of(mesh.devices.flat[0])
    report["roofline"] = (roofline.estimate(generation, report["model_flops_per_chip"],
                                            sum(v["bytes"] for v in report["collectives"].values()),
                                            hbm_bytes_per_chip=report["hbm_bytes"])
                          if generation and report["collectives"] is not None else None)
    return report


def _attention_backend(run: Any) -> str:
    """The self-attention backend the run's train step uses (its batches are packed: segment ids)."""
    from mistral_jax.model import backends as backends_lib
    from mistral_jax.model.attention import self_attention_backend

    b = backends_lib.resolve(run.model_cfg, run.mesh, run.rules)
    return self_attention_backend(run.model_cfg, b, run.data.seq_len, True)


def _attention_exchange(run: Any, hlo_text: str) -> dict[str, Any] | None:
    """Context parallelism (the sequence split over ``context`` shards): the attention backend and the bytes per
    chip and step its exchanges move (the collectives under ``model.context.SCOPE``); None without it."""
    from mistral_jax.model import backends as backends_lib
    from mistral_jax.model import context
    from mistral_jax.model.attention import self_attention_backend

    b = backends_lib.resolve(run.model_cfg, run.mesh, run.rules)
    if b.context == 1:
        return None
    name = self_attention_backend(run.model_cfg, b, run.data.seq_len, True)
    traffic = hlo.collective_traffic(hlo_text, scope=context.SCOPE)
    return dict(backend=name, context=b.context, bytes=traffic.bytes,
                count=sum(v["count"] for v in traffic.kinds.values()))


def compile_train_step(run_cfg: Any, devices: list[Any]) -> dict[str, Any]:
    """Resolve ``run_cfg`` on ``devices`` as ``train.py`` does and compile its train step; returns the report.

    The report is ``compile_run``'s plus the run's shape (batch, sequence, slices, remat, dtype, backends).

    The devices' platform is the target platform (TPU topology devices: ``auto`` backends resolve for the TPU).
    Multi-slice devices get ``mesh.dcn_data = slices`` unless the config sets its ``dcn_*`` axes.
    """
    from mistral_jax.training import run as run_lib

    n_slices = sharding.num_slices(devices)
    if n_slices > 1 and all(int(run_cfg.mesh.get(f"dcn_{a}", 1)) == 1 for a in sharding.DCN_AXES):
        run_cfg = run_cfg.copy_and_resolve_references()
        run_cfg.mesh.dcn_data = n_slices  # data parallelism across the slices
    run = run_lib.resolve(run_cfg, devices=devices, process_count=1, require_checkpoint=False)
    report = compile_run(run)
    report["attention_backend"] = _attention_backend(run)
    if (report.get("attention") or {}).get("backend") == "halo":  # the ring's figures beside the halo's
        ring_cfg = run_cfg.copy_and_resolve_references()
        ring_cfg.model.attention_impl = "ring"
        ring = compile_run(run_lib.resolve(ring_cfg, devices=devices, process_count=1, require_checkpoint=False))
        if ring.get("attention"):
            report["attention"]["ring"] = dict(bytes=ring["attention"]["bytes"], total=ring["total"])
    model_cfg = run.model_cfg
    report.update(
        slices=n_slices, dcn={f"dcn_{a}": int(run_cfg.mesh.get(f"dcn_{a}", 1)) for a in sharding.DCN_AXES},
        batch_size=run.data.batch_size, seq_len=run.data.seq_len, grad_accum_steps=run.data.grad_accum_steps,
        remat=model_cfg.remat, dtype=model_cfg.dtype, matmul_quant=model_cfg.matmul_quant,
        attention_impl=model_cfg.attention_impl,
        moe_impl=model_cfg.moe_impl, platform=model_cfg.platform,
    )
    start = run.recipe.init_from
    if start is None or (start and not os.path.isdir(start)):
        report["note"] = (f"config.init_from={start!r} is not a directory here: compiled config.model's architecture "
                          f"(preset {run_cfg.model.preset!r})")
    return report


def format_report(r: dict[str, Any], title: str) -> str:
    """``compile_train_step``'s report as text: one line per topic under ``title``."""
    def gib(x):
        return f"{x / GiB:8.2f} GiB"

    slices = f", {r['slices']} slices: {r['dcn']}" if r.get("slices", 1) > 1 else ""
    lines = [title,
             f"  mesh {r['mesh']} ({r['devices']} chips{slices}), rules {r['rules']}, batch {r['batch_size']} x "
             f"{r['seq_len']} (grad_accum {r['grad_accum_steps']}), remat {r['remat']}, dtype {r['dtype']}, attention "
             f"{r['attention_impl']}{_resolved(r)}, moe {r['moe_impl']} (for {r['platform']})",
             f"  recipe: {r['recipe']}: {r['trainable_params']:,} trainable parameters, {r['frozen_params']:,} frozen",
             *([f"  note: {r['note']}"] if r.get("note") else []),
             f"  per chip state: params {gib(r['state']['params'])}  frozen {gib(r['state']['frozen'])}  optimizer "
             f"{gib(r['state']['opt_state'])}",
             f"  per chip: arguments {gib(r['arguments'])}  outputs {gib(r['outputs'])}  aliased {gib(r['aliased'])}"
             f"  temps {gib(r['temps'])}",
             f"  per chip: total {gib(r['total'])} of HBM {gib(r['hbm'])} -> "
             + ("FITS" if r["fits"] or (r.get("programs") and r["total"] <= (r["hbm"] or 0)) else "DOES NOT FIT")
             + (f" (and {gib(r['host_temps']).strip()} of host memory)" if r.get("host_temps") else ""),
             *([f"  compiler: {r['compiler_error']} (temps alone; arguments not counted)"] if "compiler_error" in r
               else []),
             *_program_lines(r, gib),
             f"  FLOPs per step per chip: model (6N + attention) {r['model_flops_per_chip']:.3e}; XLA cost analysis "
             f"{r['flops']:.3e} (counts each scan / while-loop body once)",
             *_collective_lines(r),
             *_attention_lines(r),
             *_quant_lines(r),
             f"  compiled in {r['compile_s']} s"]
    return "\n".join(lines)


def _program_lines(r: dict[str, Any], gib: Any) -> list[str]:
    """The recipe's other programs (RL rollouts): each one's memory with the train state resident."""
    out = []
    programs = r.get("programs") or {}
    for name, p in programs.items():
        g = {k: gib(p[k]).strip() for k in ("total", "arguments", "temps", "resident", "with_state")}
        parts = "  ".join(f"{k.replace('_', ' ')} {gib(v).strip()}" for k, v in p["parts"].items() if v)
        fits = "" if r.get("hbm") is None else " -> FITS" if p["with_state"] <= r["hbm"] else " -> DOES NOT FIT"
        out.append(f"  {name}: program {g['total']} (arguments {g['arguments']}, temps {g['temps']}) + resident "
                   f"{g['resident']} = {g['with_state']} per chip{fits} ({parts})")
    if programs and r.get("hbm") is not None:
        verdict = "FITS" if r["fits"] else "DOES NOT FIT"
        out.append(f"  the run: {verdict} (the train step and every program above)")
    return out


def _resolved(r: dict[str, Any]) -> str:
    name = r.get("attention_backend")
    return f" -> {name}" if name and name != r.get("attention_impl") else ""


def _attention_lines(r: dict[str, Any]) -> list[str]:
    """Context parallelism: the attention exchanges (and the ring's, when the halo runs)."""
    a = r.get("attention")
    if not a:
        return []
    line = (f"  attention over context={a['context']} shards: {a['backend']} moves {hlo.size(a['bytes'])} per step per "
            f"chip ({a['count']} exchanges)")
    if a.get("ring"):
        line += (f"; ring attention would move {hlo.size(a['ring']['bytes'])} and need "
                 f"{a['ring']['total'] / GiB:.2f} GiB per chip")
    return [line]


def _quant_lines(r: dict[str, Any]) -> list[str]:
    """Quantized training: the compiled program's matmuls by operand types (the quantized ones are what the chip's
    int8 / fp8 rate applies to)."""
    if r.get("matmul_quant", "none") == "none" or not r.get("dot_types"):
        return []
    kinds = ", ".join(f"{n} {k}" for k, n in r["dot_types"].items())
    return [f"  matmul_quant {r['matmul_quant']} (qwix): the program's matmuls by operand types: {kinds}"]


def _seconds(x: float) -> str:
    return next(f"{x * scale:.3g} {unit}" for unit, scale in (("s", 1), ("ms", 1e3), ("us", 1e6))
                if x * scale >= 1 or unit == "us")


def _collective_lines(r: dict[str, Any]) -> list[str]:
    """The report's collectives and roofline lines (none for a program the compiler refused)."""
    if r.get("collectives") is None:
        return []
    traffic = hlo.CollectiveTraffic(r["collectives"], r["collective_loops_counted_once"])
    loops = r["collective_loops_counted_once"]
    lines = [f"  collectives per step per chip: {hlo.describe(traffic)}"
             + (f" ({len(loops)} while loop(s) of unknown trip count counted once)" if loops else "")]
    rl = r.get("roofline")
    if rl:
        mfu = f"{rl['mfu']:.0%}" if rl["mfu"] is not None else "n/a"
        hbm = f"HBM {_seconds(rl['hbm_s'])} ({hlo.size(r['hbm_bytes'])}), " if rl.get("hbm_s") is not None else ""
        lines.append(f"  roofline ({rl['generation']}: {rl['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
                     f"{rl['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM, {rl['ici_bytes_per_s'] / 1e9:.0f} GB/s ICI): "
                     f"compute {_seconds(rl['compute_s'])}, {hbm}collectives {_seconds(rl['collectives_s'])} -> "
                     f"step >= {_seconds(rl['step_s'])} ({rl['bound']}-bound, perfect overlap), MFU <= {mfu}")
    return lines
