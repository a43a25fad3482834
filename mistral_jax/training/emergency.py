"""Emergency checkpoints: a fast local tier in front of the persistent one (``config.checkpoint.local_*``).

``TieredCheckpointer`` has ``Checkpointer``'s interface (the loop and the trainer use either) and two tiers:

* **persistent**: ``{workdir}/checkpoints`` (local disk or bucket), every ``checkpoint.every_steps``, at the end
  and on a preemption signal: the ``Checkpointer`` of ``checkpoint.py``, unchanged (eval, export and
  ``restore_checkpoint_params`` read only this tier);
* **local**: every ``checkpoint.local_every_steps`` into ``{checkpoint.local_dir}/<run id>/process-<i>`` on each
  host's own disk (a RAM disk such as ``/dev/shm`` or a local SSD), through Orbax's emergency
  ``CheckpointManager`` (``orbax.checkpoint.experimental.emergency``). Orbax keeps one copy per *replica* of the
  train state: the mesh's ``data`` axis must split the processes into two or more replicas (each holding a whole
  copy: parameters are never sharded over ``data``); replica 0 writes nothing locally (in Orbax's design it is
  the one that writes the persistent tier), the others write their own shards. The JSON part of a step (the data
  position, the run's metadata) goes beside it, ``meta/<step>.json``, on every process.

Restore (``restore_latest``): the newest step of either tier. A local step counts when every process of at least
one replica holds it complete (Orbax's rule); that replica reads it and broadcasts it to the others over the
mesh. A replaced host (an empty local tier) or a local step older than the persistent one makes every process
restore from the persistent tier instead, whose steps are intact by construction: nothing is lost but the steps
after the newest step of either tier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np

from mistral_jax import distributed, storage
from mistral_jax.training.checkpoint import Checkpointer

log = logging.getLogger(__name__)

REPLICA_AXIS = "data"
META_DIR = "meta"


class LocalTierError(ValueError):
    """A local tier that cannot work with this run's processes or mesh (raised before any save)."""


def run_id(workdir: str) -> str:
    """The local tier's directory name for a workdir: runs sharing a ``local_dir`` never see each other's steps."""
    return hashlib.sha256(storage.absolute(workdir).encode()).hexdigest()[:16]


def local_directory(local_dir: str, workdir: str, process: int | None = None) -> str:
    """``{local_dir}/<run id>/process-<i>``: this process's local tier (one per process, so processes sharing a
    host and its disk never share a directory)."""
    i = jax.process_index() if process is None else process
    return os.path.join(os.path.abspath(os.path.expanduser(local_dir)), run_id(workdir), f"process-{i}")


def has_local_steps(local_dir: str, workdir: str) -> bool:
    """Whether this process's local tier of ``workdir`` holds any step (finished or not)."""
    state = os.path.join(local_directory(local_dir, workdir), "state")
    return os.path.isdir(state) and any(name.isdigit() for name in os.listdir(state))


def replicas(mesh: jax.sharding.Mesh, axis: str = REPLICA_AXIS) -> list[set[int]]:
    """The processes of each replica of the train state along ``axis`` (one set per index of the axis)."""
    k = mesh.axis_names.index(axis)
    devs = np.moveaxis(np.asarray(mesh.devices), k, 0)
    return [{d.process_index for d in devs[i].reshape(-1)} for i in range(devs.shape[0])]


def check_local_tier(mesh: jax.sharding.Mesh, local_dir: str) -> None:
    """Raise ``LocalTierError`` unless the mesh gives Orbax's emergency manager what it needs."""
    groups = replicas(mesh)
    sizes = dict(mesh.shape)
    if len(groups) < 2:
        raise LocalTierError(
            f"config.checkpoint.local_dir={local_dir!r} needs two or more replicas of the train state, but the "
            f"mesh {sizes} has data={len(groups)}: Orbax's emergency checkpoints restore a local copy from one "
            "replica and broadcast it to the others. Fix: set mesh.data (or mesh.dcn_data across slices) to 2 or "
            "more, or leave checkpoint.local_dir empty (persistent checkpoints only).")
    for i, a in enumerate(groups):
        for j, b in enumerate(groups[:i]):
            if a & b:
                raise LocalTierError(
                    f"config.checkpoint.local_dir={local_dir!r}: replicas {j} and {i} of the mesh's data axis share "
                    f"process(es) {sorted(a & b)} ({jax.process_count()} process(es), mesh {sizes}), but each "
                    "replica must live on its own hosts for a local copy to survive one of them. Fix: make "
                    "mesh.data (or mesh.dcn_data) divide the process count, with one process per host, or leave "
                    "checkpoint.local_dir empty.")


def _quiet_absl_flags() -> None:
    """Orbax's emergency restore reads an absl flag; a program that never parsed absl flags would fail there."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TieredCheckpointer:
    """``Checkpointer``'s interface over a persistent tier (a ``Checkpointer``) and Orbax's local tier.

    Args:
      persistent: the ``{workdir}/checkpoints`` tier.
      local_dir: the root of the local tier on every host (``checkpoint.local_dir``).
      workdir: the run's workdir (names the run's directory under ``local_dir``).
      mesh: the run's mesh (its ``data`` axis gives the replicas).
      abstract_state: the train state's layout (``step``, ``params``, ``opt_state``) with shardings.
      every_steps: local save interval (``checkpoint.local_every_steps``).
      keep: local steps kept (``checkpoint.local_keep``).
      fresh: the run starts at step 0: an old local tier of this workdir is removed first.
    """

    def __init__(self, persistent: Checkpointer, *, local_dir: str, workdir: str, mesh: jax.sharding.Mesh,
                 abstract_state: dict[str, Any], every_steps: int, keep: int = 2, fresh: bool = False):
        from orbax.checkpoint._src.multihost import multihost as ocp_multihost
        from orbax.checkpoint.experimental.emergency import checkpoint_manager as emergency

        check_local_tier(mesh, local_dir)
        if every_steps < 1 or keep < 1:
            raise LocalTierError(f"config.checkpoint.local_every_steps={every_steps}, local_keep={keep}: both must "
                                 "be >= 1. Fix: set them to positive integers.")
        self.persistent, self.mesh, self.every_steps = persistent, mesh, int(every_steps)
        self.directory = persistent.directory  # what the loop reports: the persistent tier
        self.local = local_directory(local_dir, workdir)
        if fresh and os.path.isdir(self.local):
            shutil.rmtree(self.local)
        os.makedirs(os.path.join(self.local, META_DIR), exist_ok=True)
        self._orbax_dir = os.path.join(self.local, "state")
        unused = os.path.join(self.local, "unused-persistent")
        for d in (self._orbax_dir, unused):
            os.makedirs(d, exist_ok=True)
        _quiet_absl_flags()
        ocp_multihost.initialize_runtime_to_distributed_ids()
        ocp_multihost.initialize_distributed_to_device_ids()
        self._abstract = {"params": abstract_state["params"], "opt_state": abstract_state["opt_state"]}
        self._step_sharding = abstract_state["step"].sharding
        never = lambda step, latest=None: False  # noqa: E731 - Orbax's persistent tier of this manager is unused
        options = emergency.CheckpointManagerOptions(
            local=emergency.LocalCheckpointOptions(save_interval_steps=self.every_steps, max_to_keep=int(keep)),
            persistent=emergency.PersistentCheckpointOptions(should_save_fn=never),
            replica_axis_index=mesh.axis_names.index(REPLICA_AXIS),
            enable_async_checkpointing=persistent.async_save)
        # Orbax's own persistent tier (written by replica 0 only when it decides to save: never, above) stays in
        # this process's local directory; the run's persistent tier is ``persistent``.
        self.manager = emergency.CheckpointManager(self._orbax_dir, unused,
                                                   mesh, self._abstract, options=options)
        self.last_saved: dict[str, Any] = {}  # {"tier": ...} of the last save() that started one
        self.restored_from = "persistent"  # restore_latest: which tier the run resumed from

    # ------------------------------------------------------------------ the Checkpointer interface
    def all_steps(self) -> list[int]:
        return self.persistent.all_steps()

    def finalized_steps(self) -> list[int]:
        return self.persistent.finalized_steps()

    def due(self, step: int, *, force: bool = False) -> bool:
        return self.persistent.due(step, force=force) or self._local_due(step)

    def _local_due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any], meta: dict[str, Any], *,
             force: bool = False) -> bool:
        """The persistent tier when it is due (or ``force``), else the local tier when it is due."""
        import orbax.checkpoint as ocp

        self.last_saved = {}
        if self.persistent.due(step, force=force):
            started = self.persistent.save(step, state, data_state, meta, force=force)
            self.last_saved = {"tier": "persistent"} if started else {}
            return started
        if not self._local_due(step):
            return False
        with open(os.path.join(self.local, META_DIR, f"{step}.json.tmp"), "w") as f:
            json.dump({"data_state": data_state, "meta": {**meta, "step": int(step)}}, f)
        os.replace(os.path.join(self.local, META_DIR, f"{step}.json.tmp"),
                   os.path.join(self.local, META_DIR, f"{step}.json"))
        tree = {"params": state["params"], "opt_state": state["opt_state"]}
        with jax.set_mesh(None):  # Orbax's own collectives (shard_map over its mesh) run outside the loop's mesh
            # not force: forced, Orbax's replica 0 would write its (unused) persistent tier too
            started = bool(self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree))))
        self._prune_meta(step)
        self.last_saved = {"tier": "local"} if started else {}
        return started

    def _prune_meta(self, step: int) -> None:
        with jax.set_mesh(None):
            keep = set(self.manager.all_steps()) | {step}
        for name in os.listdir(os.path.join(self.local, META_DIR)):
            s = name.split(".", 1)[0]
            if s.isdigit() and int(s) not in keep and int(s) < step:
                os.remove(os.path.join(self.local, META_DIR, name))

    def check(self, block: bool = False, current_step: int | None = None) -> None:
        self.persistent.check(block=block, current_step=current_step)
        if block:
            self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def wait(self) -> None:
        self.persistent.wait()
        self.manager.wait_until_finished()

    def check_compatible(self, abstract_state: dict[str, Any]) -> dict[int, BaseException]:
        return self.persistent.check_compatible(abstract_state)

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        finally:
            self.persistent.close()

    # ------------------------------------------------------------------ restore
    def restore_latest(self, abstract_state: dict[str, Any]) -> tuple[int, dict[str, Any], dict, dict] | None:
        """The newest step of either tier: ``(step, state, data_state, meta)``, or None if neither has one."""
        persistent = self.persistent.finalized_steps()
        with jax.set_mesh(None):
            local = [int(s) for s in self.manager.all_steps()]
        newest_local = max(local, default=None)
        newest_persistent = max(persistent, default=None)
        if newest_local is not None and (newest_persistent is None or newest_local > newest_persistent):
            got = self._restore_local(newest_local)
            if got is not None:
                return got
        elif newest_local is None and any(os.listdir(os.path.join(self.local, META_DIR))):
            log.warning("the local tier of this process (%s) has no complete step on any replica: restoring from "
                        "the persistent tier %s.", self.local, self.directory)
        return self.persistent.restore_latest(abstract_state)

    def _restore_local(self, step: int) -> tuple[int, dict[str, Any], dict, dict] | None:
        import orbax.checkpoint as ocp

        path = os.path.join(self.local, META_DIR, f"{step}.json")
        mine = None
        if os.path.exists(path):
            with open(path) as f:
                mine = json.load(f)
        found = next((m for m in distributed.allgather_json(mine) if m is not None), None)
        if found is None:  # no process kept the step's data position: the persistent tier it is
            log.warning("local step %d has no data position on any process: restoring from the persistent tier.",
                        step)
            return None
        with jax.set_mesh(None):
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(self._abstract)))
        tree = out.state
        state = {"params": tree["params"], "opt_state": tree["opt_state"],
                 "step": jax.device_put(jax.numpy.asarray(int(step), jax.numpy.int32), self._step_sharding)}
        log.info("restored step %d from the local tier (%s; the persistent tier's newest is %s)", step,
                 os.path.dirname(self.local), max(self.persistent.finalized_steps(), default=None))
        self.restored_from = "local"
        return step, state, dict(found["data_state"]), dict(found["meta"])
