"""One process of the multi-host test (tests/test_multihost.py); also the single-process reference.

Usage: python tests/multihost_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES
Trains the tiny Mixtral for 3 steps on an FSDP+TP+EP mesh over all processes' devices, saves an Orbax
checkpoint, restores it onto fresh shardings, trains a 4th step from the restored state, and (process 0)
writes ``result.json`` with the losses, per-parameter sums and whether the restored state is identical.
"""

import json
import os
import sys

out_dir, num_processes, process_id, port, local_devices = sys.argv[1], *map(int, sys.argv[2:6])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", local_devices)
jax.config.update("jax_default_matmul_precision", "float32")

from mistral_jax import distributed  # noqa: E402

distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mistral_jax as mj  # noqa: E402
from configs import base  # noqa: E402
from mistral_jax import sharding as sh  # noqa: E402
from mistral_jax.training import step as step_lib  # noqa: E402
from mistral_jax.training.checkpoint import Checkpointer  # noqa: E402
from mistral_jax.training.optimizer import make_optimizer  # noqa: E402

B, T = 8, 16
assert jax.device_count() == 8 and jax.process_count() == num_processes, (jax.device_count(), jax.process_count())

rc = base.get_config()
rc.optimizer.warmup_steps, rc.optimizer.schedule, rc.optimizer.learning_rate = 0, "constant", 1e-3
cfg = mj.ModelConfig.tiny_mixtral()
mesh = sh.mesh_from_config(dict(fsdp=2, tensor=2, expert=2))
rules = sh.rules_from_config(dict(rules="auto"), mesh)
graphdef, state, shardings = step_lib.make_train_state(cfg, rc, mesh, rules)
tx, sched = make_optimizer(rc.optimizer, int(rc.num_steps))
train_step = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, schedule=sched)


def batch_for(step):  # every process builds only its own rows of the global batch
    rng = np.random.default_rng(step)
    tok = rng.integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
    full = dict(tokens=tok[:, :-1], targets=tok[:, 1:], weights=np.ones((B, T), np.float32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
                segment_ids=np.ones((B, T), np.int32))
    local = {k: v[distributed.process_row_slice(B)] for k, v in full.items()}
    return distributed.global_batch(local, {k: sh.batch_sharding(mesh, rules) for k in local})


def sums(params):
    return {jax.tree_util.keystr(k): float(v) for k, v in
            jax.tree_util.tree_flatten_with_path(jax.jit(lambda p: jax.tree.map(jnp.sum, p))(params))[0]}


losses = []
with sh.use_mesh(mesh, rules):
    for i in range(3):
        state, metrics = train_step(state, batch_for(i))
        losses.append(float(metrics["loss"]))
    before = sums(state["params"])
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), every_steps=1, keep=2, async_save=True)
    ckpt.save(3, state, {"rows_seen": 3 * B}, {"model_config": cfg.to_dict()}, force=True)
    ckpt.wait()
    _, abstract, _ = step_lib.make_train_state(cfg, rc, mesh, rules, abstract=True)
    step, restored, data_state, meta = ckpt.restore_latest(abstract)
    ckpt.close()
    restored["frozen"] = state["frozen"]  # not checkpointed (empty here: every weight trains), as the trainer does
    after = sums(restored["params"])
    # every element of params and optimizer state equal, compared as global arrays (a swapped or misplaced shard
    # keeps the per-parameter sums but fails this)
    same = jax.jit(lambda a, b: jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x, y: jnp.all(x == y), a, b)))
    identical = {k: bool(same(state[k], restored[k])) for k in ("params", "opt_state")}
    # the check can fail: rolling each parameter by half its rows (what swapped shards do) keeps every sum
    rolled = jax.tree.map(lambda x: jnp.roll(x, x.shape[0] // 2, 0), restored["params"])
    identical["rolled_params"] = bool(same(state["params"], rolled))
    rolled_sums = sums(rolled)
    specs_ok = all(a.sharding.spec == s.spec for a, s in zip(jax.tree.leaves(restored["params"]),
                                                             jax.tree.leaves(shardings["params"]), strict=True))
    restored, metrics = train_step(restored, batch_for(3))
    losses.append(float(metrics["loss"]))
    final = sums(restored["params"])

if distributed.is_main_process():
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(dict(losses=losses, before=before, after=after, final=final, restored_step=step,
                       data_state=data_state, meta_step=meta["step"], specs_ok=specs_ok, identical=identical,
                       rolled_sums=rolled_sums,
                       process_count=jax.process_count(), local_devices=jax.local_device_count()), f)
distributed.sync("done")
