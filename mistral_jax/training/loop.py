"""The training loop: steps, metrics, held-out evaluation, checkpoints, preemption and the recipe's hooks.

``run_loop`` is what ``trainer.train`` runs once the workdir is locked and checked and the train state's layout is
built: each step it reads this process's batch, calls the recipe's hooks (``training.hooks``: rollout, before
step), runs the jitted train step, calls the after-step hook, logs metrics every ``log_every`` steps, evaluates
every ``eval_every`` steps (``evaluate``, then the eval hook), saves checkpoints (every process's data position,
``saved_data_state``, and the hooks' extras in the meta) and stops all processes at the same step on a signal
(``Preemption``). See ``training.trainer`` for the workdir layout and the fault handling.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import ConfigDict

from mistral_jax import distributed, sharding, storage
from mistral_jax.data import loader
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training import goodput as goodput_lib
from mistral_jax.training import goodput_recorder
from mistral_jax.training import step as step_lib
from mistral_jax.training.checkpoint import Checkpointer
from mistral_jax.training.hooks import Hooks, LoopContext, StopRun
from mistral_jax.training.metrics import MetricsWriter, read_events, read_metrics
from mistral_jax.training.profiling import Profiler, compiled_memory, memory_metrics
from mistral_jax.training.progress import StepBar
from mistral_jax.training.recipe import Recipe
from mistral_jax.training.run import RunSpec
from mistral_jax.training.watchdog import Watchdog, maybe_stall

log = logging.getLogger(__name__)

HANGS_DIR = "hangs"  # {workdir}/hangs/hang-p{process}-step{step}.txt: the watchdog's stack dumps (local workdirs)


# --------------------------------------------------------------------------- data and signals
def saved_data_state(local: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``data_state``: every process's position. The loader of prepared data (and raw files) has
    one position for all processes (resumable on any process count); other streams (hub datasets, chat) are kept
    per process."""
    if jax.process_count() == 1:
        return local
    states = distributed.allgather_json(local)
    if all(st == states[0] for st in states) and states[0].get("kind") == loader.STATE_KIND:
        return states[0]  # prepared data: one global batch index, the same on every process
    return {"process_count": jax.process_count(), "processes": states}


def local_data_state(saved: dict[str, Any]) -> dict[str, Any]:
    """This process's data position from a checkpoint's ``data_state`` (see ``saved_data_state``)."""
    if "processes" not in saved:
        if jax.process_count() > 1 and saved.get("kind") != loader.STATE_KIND:
            log.warning("the checkpoint holds one data position (a run of 1 process) for %d processes: each "
                        "process resumes from it, so the data order differs from an uninterrupted run.",
                        jax.process_count())
        return saved
    per = saved["processes"]
    if len(per) != jax.process_count():
        log.warning("the checkpoint holds the data positions of %d processes, this run has %d: the data order "
                    "differs from an uninterrupted run.", len(per), jax.process_count())
    return per[jax.process_index() % len(per)]


RECIPE_EXTRAS = "recipe"  # the checkpoint meta's key of the recipe hooks' extras (Hooks.checkpoint_extras)


def with_extras(meta: dict[str, Any], hooks: Hooks, step: int) -> dict[str, Any]:
    """The checkpoint ``meta`` of ``step``: the run's plus the hooks' extras (a JSON copy: a save may be async)."""
    extras = hooks.checkpoint_extras(step)
    return {**meta, RECIPE_EXTRAS: json.loads(json.dumps(extras))} if extras else meta


class Preemption:
    """Records SIGTERM / SIGINT; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handler (tests calling train() from a thread)
                pass
        return self

    def _handle(self, signum, _frame):
        log.warning("received signal %d: saving a checkpoint after the current step, then exiting.", signum)
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second signal acts at once

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def evaluate(cfg: ConfigDict, recipe: Recipe, eval_fn, state: dict[str, Any], source, tok: Tokenizer,
             bsharding, batch_shardings: dict[str, Any] | None = None) -> dict[str, float]:
    """Held-out metrics of ``state`` (the recipe objective's ``eval_summary``, e.g. token loss and perplexity) over
    ``cfg.eval_steps`` batches of the validation split (from its start)."""
    micro = cfg.batch_size // cfg.grad_accum_steps
    it = recipe.batches(source, tok, micro, train=False, bsharding=bsharding)
    rows = recipe.local_rows(source, bsharding, micro)
    if batch_shardings is None:
        ctx = sharding.current()
        batch_shardings = step_lib.batch_shardings(recipe.objective, bsharding.mesh,
                                                   ctx[1] if ctx else sharding.DEFAULT_RULES)
    sums: dict[str, float] = {}
    for _ in range(cfg.eval_steps):
        local = next(it, None)
        local = local if local is not None else recipe.empty_batch(rows)
        batch = distributed.global_batch(local, batch_shardings)
        out = jax.device_get(eval_fn(state["params"], state["frozen"], batch))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return recipe.objective.eval_summary(sums)


# --------------------------------------------------------------------------- loop
def run_loop(run: RunSpec, workdir: str, tok: Tokenizer, ckpt: Checkpointer, restored: tuple | None, graphdef: Any,
             shardings: dict[str, Any], tx: Any, schedule: Any, *,
             initial_state: Callable[[], tuple[int, dict[str, Any], Any]], restore_seconds: float = 0.0
             ) -> dict[str, Any]:
    """Train ``run`` from ``initial_state()`` (``(step, state, data_state)``: the restored checkpoint ``restored`` or
    step 0) to ``cfg.num_steps``: the loop of ``trainer.train``, which has locked the workdir, checked it, built the
    train state's layout and opened the checkpoints. Returns ``trainer.train``'s result."""
    cfg, model_cfg, mesh, rules, recipe = run.cfg, run.model_cfg, run.mesh, run.rules, run.recipe
    train_src, eval_src = (recipe.ready_data(recipe.open_data(split), tok) for split in ("train", "validation"))
    bsharding = sharding.batch_sharding(mesh, rules)
    batch_shardings = step_lib.batch_shardings(recipe.objective, mesh, rules)
    data_it = recipe.batches(train_src, tok, cfg.batch_size, train=True, bsharding=bsharding)
    start, state, data_state = initial_state()
    hooks = recipe.hooks()
    tier = getattr(ckpt, "restored_from", "persistent")  # emergency.TieredCheckpointer: local or persistent
    if restored is not None:
        data_it.set_state(local_data_state(data_state))
        log.info("resumed from %s at step %d", "the local tier" if tier == "local" else ckpt.directory, start)
    data_state = data_it.get_state()  # this process's position before the first batch (saved if a hook stops the run)
    hooks.setup(LoopContext(run=run, graphdef=graphdef, tokenizer=tok, workdir=workdir))
    hooks.restore_extras(dict(restored[3].get(RECIPE_EXTRAS) or {}) if restored is not None else {})
    meta = {"seed": cfg.seed, "model_config": model_cfg.to_dict()}

    step_fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, grad_accum_steps=cfg.grad_accum_steps,
                                      schedule=schedule, objective=recipe.objective)
    eval_fn = (step_lib.jit_eval_step(graphdef, shardings, mesh, rules, recipe.objective) if eval_src is not None
               else None)
    flops_tok = run.flops_per_step / run.data.tokens_per_step  # mistral_jax.flops: the dry run's and AOT's count
    peak, peak_how = run.peak_flops()
    log.info("model FLOPs/token %.3g; peak %.3g FLOP/s (%s)", flops_tok, peak, peak_how)
    writer = MetricsWriter(workdir, cfg=cfg)
    earlier, redo_until = goodput_lib.previous(*(_records(workdir) if restored is not None else ([], [])))
    goodput = goodput_lib.Goodput(earlier, redo_until=redo_until)
    goodput.add("checkpoint", restore_seconds)
    profiler = Profiler(cfg, workdir)
    recorder = goodput_recorder.Recorder(cfg, workdir, jax.process_index())  # config.goodput.recorder
    if recorder:
        goodput.listeners.append(recorder.timed)
    wcfg = cfg.get("watchdog")
    watch = None
    if wcfg is not None and wcfg.enabled:
        dump = None if storage.is_remote(workdir) else os.path.join(workdir, HANGS_DIR)
        watch = Watchdog(factor=wcfg.factor, min_seconds=wcfg.min_seconds, compile_seconds=wcfg.compile_seconds,
                         exit_on_hang=wcfg.exit, dump_dir=dump)
        watch.start()
    hangs_seen = 0
    compiled = None
    if start < cfg.num_steps:  # a finished run started again writes nothing
        if recorder:
            recorder.job_start(goodput.start, time.time())
        if restored is not None:
            writer.event("resume", start, from_step=start, earlier_last_step=redo_until, tier=tier)
        else:
            writer.event("start", start)

    def newest() -> str | None:
        steps = ckpt.finalized_steps()
        return storage.join(ckpt.directory, str(steps[-1])) if steps else None

    result: dict[str, Any] = {"status": "done", "step": start, "signal": None, "last_metrics": {}, "eval": None,
                              "checkpoint": None, "goodput": None}
    bar = StepBar(total=cfg.num_steps, initial=start, disable=not cfg.progress_bar or jax.process_index() != 0,
                  dynamic_ncols=True, desc="train")  # its clock starts after the first (compiling) step
    skipped, window_tokens, window_start = 0, 0.0, time.perf_counter()
    try:
        with Preemption() as preempt, sharding.use_mesh(mesh, rules):
            step = start
            while step < cfg.num_steps:
                if watch is not None:
                    watch.step_started(step + 1)
                    maybe_stall(step + 1)
                ckpt.check(current_step=step)  # a failed background save stops the run here, at the next step
                if recorder:
                    recorder.step_start(step, time.time())
                profiler.before(step + 1)
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    with goodput.timed("data"), jax.profiler.TraceAnnotation("data"):
                        local = next(data_it)
                        data_before, data_state = data_state, data_it.get_state()
                    try:
                        with goodput.timed("rollout"), jax.profiler.TraceAnnotation("rollout"):
                            local = hooks.rollout(step, state, local)  # may produce the batch (samples of prompts)
                    except StopRun as e:  # the last finished step is saved, its data position before this batch
                        if restored is None or step > start:  # else the restored checkpoint is this step
                            with goodput.timed("checkpoint"):
                                ckpt.save(step, state, saved_data_state(data_before), with_extras(meta, hooks, step),
                                          force=True)
                                ckpt.wait()
                        writer.event("stopped", step, reason=str(e)[:500])
                        raise StopRun(f"{e} The run stopped before step {step + 1}; step {step} is saved in "
                                      f"{ckpt.directory} (the same command resumes there).") from e
                    with goodput.timed("data"), jax.profiler.TraceAnnotation("data"):
                        state = hooks.before_step(step, state, local)
                        _entered(watch, "global_batch")
                        batch = distributed.global_batch(local, batch_shardings)
                    if compiled is None:  # compiled ahead of its first call: timed apart, its memory known
                        need = None
                        if hasattr(step_fn, "lower"):
                            with goodput.timed("compile"):
                                compiled = step_fn.lower(state, batch).compile()
                            need = compiled_memory(compiled)
                        else:  # a wrapped step function (tests): compiled by its first call
                            compiled = step_fn
                        writer.event("compiled", step)
                    t_step = time.perf_counter()
                    _entered(watch, "train_step")
                    state, metrics = compiled(state, batch)
                    step += 1
                    metrics = hooks.after_step(step, state, metrics)
                    _entered(watch, "any_process")
                    stop = distributed.any_process(preempt.signum or 0)  # a signal on any process stops all here
                    _entered(watch, "train_step results")
                    nonfinite = int(metrics["nonfinite"])  # one scalar sync per step: a bad update caught at once
                    goodput.add(goodput.step_category(step), time.perf_counter() - t_step)
                profiler.after(step)
                if step == start + 1:
                    mem = memory_metrics()
                    log.info("memory per device: the train step needs %s (compiled estimate); after step %d: %s in "
                             "use, peak %s; host RSS %s", _gib(need), step, _gib(mem.get("memory/device_bytes_in_use")),
                             _gib(mem.get("memory/device_peak_bytes")), _gib(mem.get("memory/host_rss_bytes")))
                if nonfinite:
                    if cfg.nan_policy == "stop":
                        ckpt.wait()
                        raise FloatingPointError(
                            f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, grad_norm="
                            f"{float(metrics['grad_norm'])}); the update was not applied and step {step} was not "
                            f"saved; the newest checkpoint is {max(ckpt.all_steps(), default=None)}. Fix: lower "
                            "optimizer.learning_rate, check the data, or set nan_policy='skip'.")
                    skipped += 1
                    log.warning("non-finite loss at step %d: update skipped (%d so far).", step, skipped)
                window_tokens += float(local["weights"].sum()) * cfg.batch_size / len(local["weights"])  # global
                if step % cfg.log_every == 0 or step == cfg.num_steps or stop:
                    m = jax.device_get(metrics)
                    dt = time.perf_counter() - window_start
                    tps = window_tokens / max(dt, 1e-9)
                    m.update(tokens_per_sec=tps, step_time=dt / max(1, step - result["step"]), skipped_steps=skipped,
                             epoch=data_state["epoch"])
                    if peak:
                        m["mfu"] = tps * flops_tok / peak
                    m.update(memory_metrics())
                    m.update(goodput.record())
                    result["last_metrics"] = writer.write(step, m)
                    result["step"] = step
                    bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tps:.0f}")
                    window_tokens, window_start = 0.0, time.perf_counter()
                bar.update(1)
                busy = False  # an eval or a save this step: its time stays out of the watchdog's median
                if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                    busy = True
                    _entered(watch, "eval")
                    with goodput.timed("eval"), jax.profiler.TraceAnnotation("eval"):
                        held_out = hooks.held_out(step, state)
                        if held_out is None:
                            held_out = evaluate(cfg, recipe, eval_fn, state, eval_src, tok, bsharding, batch_shardings)
                    result["eval"] = writer.write(step, hooks.eval(step, state, held_out), prefix="eval/")
                    writer.event("eval", step)
                force = bool(stop) or step == cfg.num_steps
                if ckpt.due(step, force=force):  # every process's data position goes into the checkpoint
                    busy = True
                    _entered(watch, "checkpoint")
                    with goodput.timed("checkpoint"), jax.profiler.TraceAnnotation("checkpoint"):
                        ckpt.save(step, state, saved_data_state(data_state), with_extras(meta, hooks, step),
                                  force=force)
                    writer.event("checkpoint", step, **getattr(ckpt, "last_saved", {}))  # tier: local / persistent
                    writer.flush(force=True)  # a bucket workdir: the metrics so far go up with each checkpoint
                if watch is not None:
                    watch.step_finished(step, record=not busy and step > start + 1)
                    for h in watch.fired[hangs_seen:]:
                        writer.event("hang", h.step, seconds=round(h.elapsed, 3), slow=h.slow)
                    hangs_seen = len(watch.fired)
                if stop:
                    with goodput.timed("checkpoint"):
                        ckpt.wait()
                    result["goodput"] = _finish(writer, goodput, step, "preempted", recorder)
                    how = "" if preempt.signum else " (received by another process)"
                    log.warning("preempted by signal %d%s at step %d; checkpoint saved in %s.", stop, how, step,
                                ckpt.directory)
                    result.update(status="preempted", signal=stop, step=step, checkpoint=newest())
                    return result
            result["step"] = step
            if eval_fn is not None and step > start:
                with goodput.timed("eval"), jax.profiler.TraceAnnotation("eval"):
                    held_out = hooks.held_out(step, state)
                    if held_out is None:
                        held_out = evaluate(cfg, recipe, eval_fn, state, eval_src, tok, bsharding, batch_shardings)
                result["eval"] = writer.write(step, hooks.eval(step, state, held_out), prefix="eval/")
                writer.event("eval", step)
            with goodput.timed("checkpoint"):
                ckpt.wait()
            result["checkpoint"] = newest()
            if step > start:
                result["goodput"] = _finish(writer, goodput, step, "end", recorder)
            return result
    finally:
        if watch is not None:
            watch.close()
        profiler.stop()
        bar.close()
        writer.close()


def _records(workdir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The workdir's metrics records and events (process 0 writes them; empty elsewhere or when there are none)."""
    if jax.process_index() != 0:
        return [], []
    out = []
    for read in (read_metrics, read_events):
        try:
            out.append(read(workdir))
        except (FileNotFoundError, ValueError):
            out.append([])
    return out[0], out[1]


def _finish(writer: MetricsWriter, goodput: goodput_lib.Goodput, step: int, event: str,
            recorder: goodput_recorder.Recorder | None = None) -> str:
    """The run's last goodput record and its end event; returns the goodput line (train.py prints it)."""
    rec = goodput.record()  # in the end event (a metrics record without a loss would look like a step's)
    writer.event(event, step, **{k.removeprefix(goodput_lib.PREFIX): round(v, 3) for k, v in rec.items()})
    if recorder:
        recorder.job_end(time.time())
    return goodput.summary()


def _entered(watch: Watchdog | None, name: str) -> None:
    if watch is not None:
        watch.entered(name)


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.3f} GiB"
