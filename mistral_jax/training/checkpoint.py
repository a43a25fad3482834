"""Orbax checkpoints of a training run: ``{workdir}/checkpoints/<step>/{params,opt_state,data_state,meta}``.

* ``params``: the ``params_dict`` pytree (StandardSave) - what ``load_pretrained`` reads.
* ``opt_state``: the optax state (StandardSave).
* ``data_state``: the data iterator position (JsonSave, see ``data.pipeline.PackedBatches.get_state``).
* ``meta``: ``{"step", "seed", "model_config", ...}`` (JsonSave).

Saves are asynchronous (training continues while the files are written), every ``every_steps`` steps, keeping
the newest ``keep``. ``restore_latest`` restores the newest step that reads back intact, onto whatever
shardings the abstract target carries (so a run may resume on a different mesh); a newest step that fails to
restore is moved to ``{workdir}/corrupt_checkpoints/`` with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "data_state", "meta")


class Checkpointer:
    """A thin ``ocp.CheckpointManager`` wrapper for the train state of ``training.step``.

    Args:
      directory: ``{workdir}/checkpoints``.
      every_steps: periodic save interval (``save(..., force=True)`` saves regardless).
      keep: number of newest checkpoints kept.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, *, every_steps: int = 1000, keep: int = 3, async_save: bool = True):
        if every_steps < 1 or keep < 1:
            raise ValueError(f"config.checkpoint.every_steps={every_steps}, keep={keep}: both must be >= 1. "
                             "Fix: set them to positive integers.")
        self.directory = os.path.abspath(directory)
        self.every_steps, self.keep, self.async_save = every_steps, keep, async_save
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=self.every_steps,
                                               enable_async_checkpointing=self.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any], meta: dict[str, Any], *,
             force: bool = False) -> bool:
        """Save (asynchronously) if ``step`` is due or ``force``; returns whether a save started."""
        if step in self.manager.all_steps() or not (force or step % self.every_steps == 0):
            return False  # orbax alone would also save the first step of every run
        args = ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                  opt_state=ocp.args.StandardSave(state["opt_state"]),
                                  data_state=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave({**meta, "step": int(step)}))
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict, dict]:
        """``(state, data_state, meta)`` of ``step``, placed on the shardings of ``abstract_state``'s leaves."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_state["params"]),
                                  opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                                  data_state=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        step_sharding = abstract_state["step"].sharding
        state = {"params": out["params"], "opt_state": out["opt_state"],
                 "step": jax.device_put(jax.numpy.asarray(int(out["meta"]["step"]), jax.numpy.int32), step_sharding)}
        return state, dict(out["data_state"]), dict(out["meta"])

    def restore_latest(self, abstract_state: dict[str, Any]) -> tuple[int, dict[str, Any], dict, dict] | None:
        """Restore the newest intact step: ``(step, state, data_state, meta)``, or None if there is none.

        A step that fails to restore (truncated or missing files) is moved to ``corrupt_checkpoints/`` next to
        the checkpoint directory, with a warning, and the next older step is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                state, data_state, meta = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                self._quarantine(step, e)
                continue
            return step, state, data_state, meta
        return None

    def _quarantine(self, step: int, err: Exception) -> None:
        dest = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints", f"{step}-{int(time.time())}")
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); moving it to %s and falling back to the "
                    "previous checkpoint.", step, self.directory, type(err).__name__, str(err)[:300], dest)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        self.manager.close()
        self._open()

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(checkpoint_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Only the ``params`` item of ``step`` (default: newest intact) of ``{workdir}/checkpoints``.

    Args:
      checkpoint_dir: ``{workdir}/checkpoints``.
      abstract_params: ``ShapeDtypeStruct`` tree (with shardings) of the ``params_dict`` layout.
      step: which step; None = the newest that restores.

    Returns:
      ``(params, step)``.
    """
    manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    steps = sorted(manager.all_steps()) if step is None else [step]
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {checkpoint_dir!r}. Fix: train first, or pass a run's workdir.")
    errors = []
    for s in reversed(steps):
        try:
            out = manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
            return out["params"], s
        except Exception as e:  # noqa: BLE001
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
            log.warning("checkpoint step %d of %s does not restore; trying an older one.", s, checkpoint_dir)
    raise ValueError(f"no checkpoint in {checkpoint_dir!r} restores:\n  " + "\n  ".join(errors))
