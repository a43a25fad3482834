"""``train.py --dry_run``: everything a run does before its first step, without training or writing anything.

The run is resolved once (``training.run.resolve``) on the real devices, or on any others (a TPU topology's
compile-only devices), and compiled by ``aot.compile_run``, the AOT tool's own compile: the dry run and
``python -m mistral_jax.aot`` report the same memory, model FLOPs (``mistral_jax.flops``) and roofline MFU for the
same config and devices. The dry run adds what only a real host can check: the training data (one batch packed)
and what the run would do in its workdir.
"""

from __future__ import annotations

from typing import Any

import jax

from mistral_jax import sharding, storage
from mistral_jax.aot import _collective_lines, compile_run
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training import run as run_lib
from mistral_jax.training import trainer


def dry_run(run: Any, workdir: str, devices: list[Any] | None = None) -> dict[str, Any]:
    """Everything a run does before its first step, without training or writing anything.

    Resolves the run (unless ``run`` is a ``RunSpec`` already) on ``devices`` (default: the real global devices),
    opens the data (and packs one batch when the tokenizer is known: ``data.tokenizer``, ``init_from``'s, or the
    workdir's), builds the abstract train state (no allocation), compiles the train step on abstract inputs and
    reports ``aot.compile_run``'s figures. Nothing is created in ``workdir``; nothing is locked.

    Args:
      run: a ``training.run.RunSpec``, or a run config to resolve.
      workdir: the run's workdir (read only).
      devices: where to resolve a run config (ignored for a ``RunSpec``).

    Returns:
      ``aot.compile_run``'s dict (bytes per device, ``model_flops_per_step`` for all devices,
      ``model_flops_per_chip``, ``roofline``) plus ``processes``, ``model_flops_per_device`` (=
      ``model_flops_per_chip``), ``data`` (what was checked) and ``workdir`` (what a real run would do there).
    """
    if not isinstance(run, run_lib.RunSpec):
        run = run_lib.resolve(run, devices=devices)
    cfg = run.cfg
    workdir = storage.absolute(workdir)
    data = _dry_run_data(run, workdir, sharding.batch_sharding(run.mesh, run.rules))
    report = compile_run(run)
    prev = trainer.previous_run(workdir) if storage.path(workdir).is_dir() else {"steps": [], "holds_run": False}
    report.update(processes=jax.process_count(), model_flops_per_device=report["model_flops_per_chip"], data=data,
                  workdir=(f"would resume {workdir} from step {prev['steps'][-1]}" if prev["steps"] and
                           cfg.checkpoint.resume else f"holds a run ({trainer._describe(prev)})" if prev["holds_run"]
                           else f"would start a new run in {workdir}"))
    return report


def _dry_run_data(run: Any, workdir: str, bsharding) -> str:
    """Open the training data (and pack one batch of this process when the tokenizer is known): what was done."""
    cfg, recipe = run.cfg, run.recipe
    path = recipe.tokenizer_source() or storage.join(workdir, Tokenizer.FILENAME)
    tok = Tokenizer(path) if recipe.tokenizer_source() or storage.path(path).is_file() else None  # as the run would
    source = recipe.open_data("train")
    if tok is None:
        return f"opened {cfg.data.train} (no tokenizer yet: a real run trains one; no batch packed)"
    local = next(recipe.batches(source, tok, cfg.batch_size, train=True, bsharding=bsharding))
    shape = " x ".join(str(n) for n in local["tokens"].shape)
    return (f"opened {cfg.data.train}; packed this process's {shape} rows ({int(local['weights'].sum())} target "
            f"tokens) with {tok.path}")


def format_dry_run(r: dict[str, Any]) -> str:
    """The dry run's report, a few lines (the roofline line is the AOT tool's)."""
    def gib(x: float) -> str:
        unit = next((u for u in ("GiB", "MiB", "KiB") if x >= 1024 ** (3 - ("GiB", "MiB", "KiB").index(u))), "B")
        return f"{x / 1024 ** (3 - ('GiB', 'MiB', 'KiB', 'B').index(unit)):.2f} {unit}"

    return "\n".join([
        f"dry run: mesh {r['mesh']} over {r['devices']} devices ({r['processes']} processes), rules {r['rules']}",
        f"  recipe: {r['recipe']}: {r['trainable_params']:,} trainable parameters, {r['frozen_params']:,} frozen",
        f"  data: {r['data']}",
        f"  compiled the train step in {r['compile_s']:.1f} s; per device: arguments {gib(r['arguments'])}, outputs "
        f"{gib(r['outputs'])} (aliased {gib(r['aliased'])}), temporaries {gib(r['temps'])}, total {gib(r['total'])}",
        f"  model FLOPs per step: {r['model_flops_per_step']:.4g} ({r['model_flops_per_device']:.4g} per device); "
        f"XLA cost analysis {r['flops']:.4g} per device (counts a scanned layer once)",
        *_collective_lines(r)[1:],  # the roofline and its MFU, as the AOT tool prints them
        f"  workdir: {r['workdir']}; nothing written"])
