"""Multi-host helpers: ``jax.distributed`` start-up, process-0-only side effects, global batches from local shards.

On a TPU pod slice every host runs the same command; ``initialize()`` calls ``jax.distributed.initialize()``,
which auto-detects the coordinator, the process count and this process's id from the TPU metadata. Elsewhere
(GPU clusters, several CPU processes in tests) pass them explicitly or set the environment variables
``MISTRAL_JAX_COORDINATOR`` (``host:port``), ``MISTRAL_JAX_NUM_PROCESSES`` and ``MISTRAL_JAX_PROCESS_ID``
(SLURM / Open MPI environments are auto-detected by JAX itself; torchrun-style launchers' ``MASTER_ADDR``,
``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` are read when ours are not set: ``torchrun_env``).
Multi-node GPU: one process per host sees all its GPUs; one process per GPU sets ``MISTRAL_JAX_LOCAL_DEVICE_IDS``
(e.g. ``0`` or ``0,1``) to the GPUs it owns (under torchrun, ``LOCAL_RANK`` when ``LOCAL_WORLD_SIZE`` > 1).

A process that dies is noticed by the others through the coordination service's heartbeats: after
``MISTRAL_JAX_HEARTBEAT_TIMEOUT`` seconds (default 60) every other process is terminated by JAX with a message
naming the lost task (``The following tasks are unhealthy (stopped sending heartbeats): 1``), or naming the leader
when process 0 died; none hangs. ``MISTRAL_JAX_INIT_TIMEOUT`` (default 300 s) bounds the wait for all processes
to connect at start-up.

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
from jax.sharding import NamedSharding

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MISTRAL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MISTRAL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MISTRAL_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MISTRAL_JAX_LOCAL_DEVICE_IDS"
ENV_HEARTBEAT_TIMEOUT = "MISTRAL_JAX_HEARTBEAT_TIMEOUT"
ENV_INIT_TIMEOUT = "MISTRAL_JAX_INIT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT = 60  # seconds without heartbeats before the others stop (JAX's own default: 100)
DEFAULT_INIT_TIMEOUT = 300  # seconds to wait for every process to connect

_initialized = False


def _env_int(name: str, *, minimum: int = 0) -> int | None:
    """``int(os.environ[name])`` or None if unset / empty; a ``ValueError`` naming the variable if malformed."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={text!r} is not an integer >= {minimum}. Fix: set {name} to one (or unset it).")
    return value


def _cluster_size() -> int | None:
    """Process count announced by a cluster environment (TPU slice, multi-slice, SLURM, Open MPI, torchrun), or
    None."""
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    slices = _soft_int("MEGASCALE_NUM_SLICES") or 1
    if len(tpu_hosts) > 1 or (tpu_hosts and slices > 1):
        return len(tpu_hosts) * slices
    if "SLURM_JOB_ID" in os.environ and (_soft_int("SLURM_NTASKS") or 1) > 1:
        return _soft_int("SLURM_NTASKS")
    if (_soft_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return _soft_int("OMPI_COMM_WORLD_SIZE")
    if os.environ.get("MASTER_ADDR") and (_soft_int("WORLD_SIZE") or 1) > 1:  # torchrun-style (``torchrun_env``)
        return _soft_int("WORLD_SIZE")
    return None


def _soft_int(name: str) -> int | None:
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return None


def _cluster_detected() -> bool:
    """A multi-host TPU slice (the TPU VM runtime lists every worker), multi-slice, a multi-task SLURM job or an
    Open MPI launch of several processes (``mpirun -n N``)."""
    return _cluster_size() is not None or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def expected_process_count() -> int:
    """How many processes this run will have, read from the environment only (no device is touched).

    ``MISTRAL_JAX_NUM_PROCESSES`` if set, else what a cluster environment announces (TPU worker list times
    slices, ``SLURM_NTASKS``, ``OMPI_COMM_WORLD_SIZE``), else 1. Lets entry points reject a multi-process run's
    config before ``initialize()`` (which waits for every process) or any device use.
    """
    if jax.distributed.is_initialized():
        return jax.process_count()
    explicit = _env_int(ENV_NUM_PROCESSES, minimum=1)
    if explicit is not None:
        return explicit
    return _cluster_size() or 1


TORCHRUN_PORT_OFFSET = 1  # the JAX coordinator listens on MASTER_PORT + 1: torchrun's own agent store holds MASTER_PORT


def torchrun_env() -> tuple[str, int, int, list[int] | None] | None:
    """``(coordinator, num_processes, process_id, local_device_ids)`` from torchrun-style variables (``MASTER_ADDR``,
    ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``; ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` > 1: one process per GPU,
    which owns GPU ``LOCAL_RANK``), or None when they are not all set or ``WORLD_SIZE`` is 1. The coordinator is
    ``MASTER_ADDR:MASTER_PORT + 1`` (torchrun's agent store holds ``MASTER_PORT`` itself)."""
    names = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
    if not all(os.environ.get(n, "").strip() for n in names):
        return None
    port, world, rank = (_env_int(n, minimum=m) for n, m in (("MASTER_PORT", 1), ("WORLD_SIZE", 1), ("RANK", 0)))
    if world == 1:
        return None
    local_rank = _env_int("LOCAL_RANK")
    per_host = _env_int("LOCAL_WORLD_SIZE", minimum=1) or 1
    ids = [local_rank] if local_rank is not None and per_host > 1 else None
    return f"{os.environ['MASTER_ADDR'].strip()}:{port + TORCHRUN_PORT_OFFSET}", world, rank, ids


def _local_device_ids(value: Any) -> Any:
    if value is not None:
        return value
    text = os.environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    if not text:
        return None
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise ValueError(f"{ENV_LOCAL_DEVICE_IDS}={text!r} is not a comma-separated list of device ids. Fix: set it "
                         f"to the local GPUs this process owns, e.g. {ENV_LOCAL_DEVICE_IDS}=0 (one process per GPU) "
                         "or unset it (one process per host uses every local GPU).")
    return ids


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Any = None, force: bool = False,
               heartbeat_timeout: int | None = None, init_timeout: int | None = None) -> bool:
    """Start ``jax.distributed`` when this is one process of several; a no-op for a single process.

    Must run before anything touches a JAX device. Arguments default to the ``MISTRAL_JAX_*`` environment
    variables; on a multi-host TPU slice (or under SLURM / Open MPI) everything is auto-detected.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices (GPU clusters; default
        ``MISTRAL_JAX_LOCAL_DEVICE_IDS``, e.g. ``0,1``).
      force: call ``jax.distributed.initialize()`` even without arguments (cluster auto-detection).
      heartbeat_timeout: seconds after which a process that stopped sending heartbeats (killed, host lost) makes
        every other process stop with an error naming it (default ``MISTRAL_JAX_HEARTBEAT_TIMEOUT`` or 60).
      init_timeout: seconds to wait for every process to connect (default ``MISTRAL_JAX_INIT_TIMEOUT`` or 300).

    Returns:
      True if ``jax.distributed`` was initialised (now or by an earlier call).
    """
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES, minimum=1)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    local_device_ids = _local_device_ids(local_device_ids)
    if coordinator_address is None and num_processes is None and process_id is None:
        torchrun = torchrun_env()  # torchrun-style launchers: their variables, when ours are not set
        if torchrun is not None:
            coordinator_address, num_processes, process_id, ids = torchrun
            local_device_ids = local_device_ids if local_device_ids is not None else ids
    heartbeat = heartbeat_timeout or _env_int(ENV_HEARTBEAT_TIMEOUT, minimum=1) or DEFAULT_HEARTBEAT_TIMEOUT
    init = init_timeout or _env_int(ENV_INIT_TIMEOUT, minimum=1) or DEFAULT_INIT_TIMEOUT
    timeouts = dict(heartbeat_timeout_seconds=int(heartbeat), initialization_timeout=int(init))
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
        if ":" not in coordinator_address:
            raise ValueError(f"{ENV_COORDINATOR}={coordinator_address!r} has no port. Fix: give host:port of "
                             "process 0 (a free port on that host, the same for every process), e.g. 10.0.0.1:8476.")
        where = f"coordinator {coordinator_address}, process {process_id} of {num_processes}"
        _use_gloo_on_cpu()
        _start(where, init, coordinator_address=coordinator_address, num_processes=num_processes,
               process_id=process_id, local_device_ids=local_device_ids, **timeouts)
    elif force or _cluster_detected():
        _use_gloo_on_cpu()
        _start("cluster auto-detection (TPU slice / SLURM / Open MPI)", init, local_device_ids=local_device_ids,
               **timeouts)
    else:
        return False
    _initialized = True
    (log.info if jax.process_index() == 0 else log.debug)(
        "jax.distributed: process %d of %d, %d local / %d global devices (%s); a lost process stops the others "
        "within ~%d s", jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform, heartbeat)
    return True


class DistributedStartError(RuntimeError):
    """``jax.distributed`` could not start (coordinator unreachable, processes missing, ...)."""


def _use_gloo_on_cpu() -> None:
    """CPU processes need a cross-process collectives backend (gloo ships with jaxlib); TPU / GPU ignore it."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _start(where: str, init_timeout: int, **kwargs: Any) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises several types (timeouts, RPC errors, RuntimeError)
        first = " ".join(str(e).split())[:400]
        raise DistributedStartError(
            f"jax.distributed could not start ({where}): {type(e).__name__}: {first}. Fix: start every process "
            f"within {init_timeout} s ({ENV_INIT_TIMEOUT}) with the same {ENV_COORDINATOR} (host:port of process "
            f"0, reachable from every host) and {ENV_NUM_PROCESSES}, and distinct {ENV_PROCESS_ID}s; call it "
            "before anything touches a device.") from e


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


def process_row_slice(global_batch_size: int) -> slice:
    """The contiguous block of a global batch's rows that this process gives ``global_batch`` (rows split evenly
    over the processes, in process order); raises if the batch does not split evenly."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch of {global_batch_size} rows does not split over {n} processes. "
                         "Fix: make config.batch_size a multiple of the process count.")
    rows = global_batch_size // n
    return slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)


def global_batch(local_batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Assemble global arrays from this process's rows of a batch: one per key of ``shardings``, sharded by it
    (``sharding.batch_sharding(mesh, rules)`` for ``[B, T]`` arrays, ``step.batch_shardings`` of an objective).

    Every process calls this with its own rows (``jax.make_array_from_process_local_data``); the global batch
    holds the processes' rows where the sharding puts them. No host ever holds rows of another host.
    """
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(local_batch[k])) for k, sh in shardings.items()}


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


def any_process(flag: int) -> int:
    """The largest ``flag`` over all processes (a tiny all-gather; with one process: ``flag``, no collective).

    Every process must call it at the same point: the agreement behind a coordinated stop (a signal that reached
    only some hosts) or a shared decision (a checkpoint step that fails to restore on any host).
    """
    if jax.process_count() == 1:
        return int(flag)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))))


def allgather_json(obj: Any) -> list[Any]:
    """``[obj of process 0, obj of process 1, ...]`` for a JSON-able ``obj`` (e.g. each process's data position).

    Two small all-gathers (the lengths, then the padded UTF-8 bytes); with one process ``[obj]``.
    """
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(rows[i, :int(n)]).decode()) for i, n in enumerate(sizes)]


def sync(name: str) -> None:
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
