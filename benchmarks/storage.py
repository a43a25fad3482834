"""Checkpoint speed on a bucket against the local disk: ``python benchmarks/storage.py [--size_mb 1024]``.

A train-state-like pytree of ``--size_mb`` MB (float32: a third ``params``, two thirds ``opt_state``, in arrays of
about 16 MB) is saved and restored ``--repeats`` times through the project's ``training.checkpoint.Checkpointer``
(Orbax, asynchronous saves) into two places in the same run:

* ``local``: a directory under ``--tmp`` (default: the system's temporary directory);
* ``gcs-emulator``: ``gs://<bucket>/run/checkpoints`` on a ``fake-gcs-server`` started here on 127.0.0.1
  (``tests/emulators.py``; filesystem backend under ``--tmp``), written by tensorstore's GCS driver over HTTP.

One JSON line per figure and target (median and range over the repeats), then one per ratio (bucket / local):

* ``save_MBps``: size / (time from ``save()`` to the save being committed, ``wait()``);
* ``restore_MBps``: size / time of ``restore()`` of that step;
* ``stall_s``: how long ``save()`` blocks the training loop (the device-to-host copy; the writes run in the
  background): what a step pays per checkpoint.

The emulator writes to the local disk through HTTP, so its figures are a floor for the protocol's overhead, not a
forecast of GCS throughput (which scales with parallel streams).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _state(size_mb: int):
    import jax.numpy as jnp

    leaf = 4 * 1024 * 1024  # 16 MB of float32
    n = max(3, size_mb * 1024 * 1024 // 4 // leaf)
    arrays = [jnp.full((leaf,), float(i), jnp.float32) for i in range(n)]
    k = n // 3
    return {"params": {f"w{i}": a for i, a in enumerate(arrays[:k])},
            "opt_state": {f"m{i}": a for i, a in enumerate(arrays[k:])}}, n * leaf * 4


def _abstract(state):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def measure(directory: str, state, nbytes: int, repeats: int) -> dict[str, list[float]]:
    import jax

    from mistral_jax.training.checkpoint import Checkpointer

    out: dict[str, list[float]] = {"save_MBps": [], "restore_MBps": [], "stall_s": []}
    ckpt = Checkpointer(directory, every_steps=1, keep=2, async_save=True)
    abstract = {**_abstract(state), "step": jax.ShapeDtypeStruct((), jax.numpy.int32,
                                                                sharding=jax.tree.leaves(state)[0].sharding)}
    mb = nbytes / 2**20
    try:
        for r in range(1, repeats + 1):
            start = time.perf_counter()
            ckpt.save(r, state, {"position": r}, {"seed": 0}, force=True)
            out["stall_s"].append(time.perf_counter() - start)
            ckpt.wait()
            out["save_MBps"].append(mb / (time.perf_counter() - start))
            start = time.perf_counter()
            restored, _, _ = ckpt.restore(r, abstract)
            jax.block_until_ready(restored)
            out["restore_MBps"].append(mb / (time.perf_counter() - start))
            del restored
    finally:
        ckpt.close()
    return out


def _line(**kw) -> None:
    print(json.dumps(kw), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size_mb", type=int, default=1024, help="state size in MB (default 1024)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where the local checkpoints and the emulator's files go")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from mistral_jax import cli

    cli.quiet_libraries()
    from tests.emulators import FakeGCS

    tmp = tempfile.mkdtemp(prefix="storage-bench-", dir=args.tmp)
    server = FakeGCS(os.path.join(tmp, "fake-gcs"))
    os.environ.update(server.env)
    try:
        state, nbytes = _state(args.size_mb)
        targets = {"local": os.path.join(tmp, "local", "checkpoints"),
                   "gcs-emulator": f"{server.bucket()}/run/checkpoints"}
        results = {name: measure(where, state, nbytes, args.repeats) for name, where in targets.items()}
    finally:
        server.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    for name, res in results.items():
        for figure, values in res.items():
            _line(figure=figure, target=name, median=round(statistics.median(values), 3),
                  range=[round(min(values), 3), round(max(values), 3)], size_mb=round(nbytes / 2**20),
                  repeats=args.repeats)
    for figure in ("save_MBps", "restore_MBps", "stall_s"):
        ratios = [b / a for a, b in zip(results["local"][figure], results["gcs-emulator"][figure], strict=True)]
        _line(figure=f"{figure}_ratio", target="gcs-emulator / local", median=round(statistics.median(ratios), 3),
              range=[round(min(ratios), 3), round(max(ratios), 3)], size_mb=round(nbytes / 2**20),
              repeats=args.repeats)


if __name__ == "__main__":
    main()
