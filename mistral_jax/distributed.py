"""Multi-host helpers: ``jax.distributed`` start-up, process-0-only side effects, global batches from local shards.

On a TPU pod slice every host runs the same command; ``initialize()`` calls ``jax.distributed.initialize()``,
which auto-detects the coordinator, the process count and this process's id from the TPU metadata. Elsewhere
(GPU clusters, several CPU processes in tests) pass them explicitly or set the environment variables
``MISTRAL_JAX_COORDINATOR`` (``host:port``), ``MISTRAL_JAX_NUM_PROCESSES`` and ``MISTRAL_JAX_PROCESS_ID``
(SLURM / Open MPI environments are auto-detected by JAX itself).

Each process then loads only its share of the data (the pipelines take ``process_index`` / ``process_count``:
rows ``process_index::process_count`` of each global batch) and ``global_batch`` assembles the global
``jax.Array`` from those local rows without any host holding the whole batch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mistral_jax import sharding

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MISTRAL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MISTRAL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MISTRAL_JAX_PROCESS_ID"

_initialized = False


def _cluster_detected() -> bool:
    """A multi-host TPU slice (the TPU VM runtime lists every worker), multi-slice, or a multi-task SLURM job."""
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return "," in tpu_hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")) or slurm


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Any = None, force: bool = False) -> bool:
    """Start ``jax.distributed`` when this is one process of several; a no-op for a single process.

    Must run before anything touches a JAX device. Arguments default to the ``MISTRAL_JAX_*`` environment
    variables; on a multi-host TPU slice (or under SLURM / Open MPI) everything is auto-detected.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices (GPU clusters).
      force: call ``jax.distributed.initialize()`` even without arguments (cluster auto-detection).

    Returns:
      True if ``jax.distributed`` was initialised (now or by an earlier call).
    """
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-process start-up needs coordinator_address, num_processes and process_id; "
                             f"missing {missing} (given: coordinator_address={coordinator_address!r}, "
                             f"num_processes={num_processes!r}, process_id={process_id!r}). Fix: pass all three or "
                             f"set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes}). "
                             "Fix: number the processes 0 .. num_processes - 1.")
        if num_processes == 1:
            return False
        # CPU processes need a cross-process collectives backend (gloo ships with jaxlib); TPU / GPU ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    elif force or _cluster_detected():
        jax.distributed.initialize(local_device_ids=local_device_ids)
    else:
        return False
    _initialized = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def skip_absent_tpu() -> bool:
    """Keep JAX from starting libtpu on a host without TPU chips (libtpu installed for AOT compiles, say).

    With ``libtpu`` installed and no chips, JAX still tries the TPU backend first; that fails (JAX falls back to
    the next backend) after libtpu printed a dozen lines about TPU worker hostnames. Compiling for a TPU
    topology (``mistral_jax.aot``) loads libtpu on its own path and is unaffected. Does nothing when
    ``JAX_PLATFORMS`` names the platforms, when backends are already up, or on a host with TPU chips.

    Returns:
      True if the TPU backend was taken out of JAX's list for this process.
    """
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return False
    try:
        from jax._src import hardware_utils, xla_bridge

        if xla_bridge.backends_are_initialized() or "tpu" not in xla_bridge._backend_factories:
            return False
        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return False
        del xla_bridge._backend_factories["tpu"]
    except (ImportError, AttributeError):  # a JAX whose internals moved: the only cost is libtpu's chatter
        return False
    return True


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes metrics files and checkpoint metadata."""
    return jax.process_index() == 0


def process_rows(global_batch_size: int) -> tuple[int, int]:
    """``(process_index, rows per process)`` for a global batch; raises if it does not split evenly."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch of {global_batch_size} rows does not split over {n} processes. "
                         "Fix: make config.batch_size a multiple of the process count.")
    return jax.process_index(), global_batch_size // n


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> dict[str, jax.Array]:
    """Assemble global ``[B, T]`` arrays from this process's ``[B / process_count, T]`` rows.

    Every process calls this with its own rows (``jax.make_array_from_process_local_data``); the global batch
    is the processes' rows in process order and is sharded like ``("batch", "seq")``. No host ever holds rows
    of another host.
    """
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        s = NamedSharding(mesh, rules.spec(("batch",) + (None,) * (v.ndim - 1), mesh))
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(s, v, global_shape)
    return out


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array (the inverse of ``global_batch``)."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows, axis=0)


def sync(name: str) -> None:
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
