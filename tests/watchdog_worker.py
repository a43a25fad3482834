"""One process of the hang-watchdog acceptance test (tests/test_watchdog.py).

Usage: python tests/watchdog_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT MODE   (MODE: log | exit | notice)
Runs STEPS steps on CPU; each ends in real collectives: a jitted sum over a global array with one row per
process, then ``distributed.any_process``. ``MISTRAL_JAX_TEST_STALL`` (set by the test) stalls one process at one
step. MODE notice: only the stalled process 1 has a short limit; the others report because they see its hang
notice. Writes ``result-p{PROCESS_ID}.json`` with the watchdog's reports (unless the watchdog made it exit).
"""

import dataclasses
import json
import logging
import os
import sys

out_dir, num_processes, process_id, port, mode = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 1)

from mistral_jax import distributed  # noqa: E402

distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from mistral_jax.training.watchdog import Watchdog, maybe_stall  # noqa: E402

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"p{process_id} %(levelname)s %(message)s")
STEPS = 10
mesh = jax.make_mesh((jax.device_count(),), ("x",))
sharding = NamedSharding(mesh, PartitionSpec("x"))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))

min_seconds = 1000.0 if mode == "notice" and process_id != 1 else 2.0
with Watchdog(factor=10, min_seconds=min_seconds, compile_seconds=None, interval=0.1, publish_after=0.5,
              dump_dir=out_dir, exit_on_hang=mode == "exit", exit_grace_seconds=30) as wd:
    for step in range(STEPS):
        wd.step_started(step)
        maybe_stall(step)
        wd.entered("train_step")
        x = jax.make_array_from_process_local_data(sharding, np.full((1,), step + process_id, np.float32))
        s = float(total(x))
        assert s == num_processes * step + sum(range(num_processes)), s
        wd.entered("any_process")
        distributed.any_process(0)
        wd.step_finished(step)

with open(os.path.join(out_dir, f"result-p{process_id}.json"), "w") as f:
    json.dump(dict(fired=[dataclasses.asdict(h) for h in wd.fired], median=wd.median()), f)
distributed.sync("done")
