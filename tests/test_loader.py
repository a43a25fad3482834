"""The Grain loader of prepared data (data/loader.py) and the prepared format's checks (data/prepared.py):
per-process rows, global shuffle, epochs, mixtures, constant-time resume, validation before device work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mistral_jax.data import loader, prepared
from tests.helpers import write_prepared

SEQ = 16


WORDS = ("the", "model", "reads", "rows", "of", "tokens", "from", "shards", "in", "a", "bucket", "and", "trains",
         "on", "them", "with", "weights", "per", "dataset", "epoch")


def _texts(prefix: str, n: int) -> list[str]:
    """``n`` documents of random words (distinct rows), seeded by ``prefix``."""
    rng = np.random.default_rng(sum(map(ord, prefix)))
    return [f"{prefix} {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) for i in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer_path):
    """A prepared text dataset of 3 shards (about 150 rows of 16 tokens)."""
    dest = str(tmp_path_factory.mktemp("prepared") / "web")
    return write_prepared(dest, [_texts("alpha", 40), _texts("beta", 30), _texts("gamma", 50)], tokenizer_path, SEQ)


def _open(path):
    return prepared.open_dataset(path)


def _batches(path_or_comps, batch_size, rows, n, **kw):
    comps = [("d", _open(path_or_comps), 1.0)] if isinstance(path_or_comps, str) else path_or_comps
    it = loader.GrainBatches(comps, batch_size, rows, **kw)
    return it, [next(it) for _ in range(n)]


def test_rows_round_trip_the_packer(dataset, tokenizer_path):
    """Every stored row decodes to the packer's row (dtypes of a training batch included), shards in order."""
    from mistral_jax.data.pipeline import pack_documents
    from mistral_jax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    want = [r for texts in (_texts("alpha", 40), _texts("beta", 30), _texts("gamma", 50))
            for r in pack_documents((tok.encode(t, bos=True, eos=True) for t in texts), SEQ)]
    src = _open(dataset)
    assert len(src) == len(want)
    for i, w in enumerate(want):
        got = src[i]
        for k, v in w.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), (i, k)


def test_unshuffled_stream_is_the_prepared_order(dataset):
    """shuffle=False: global batch b is rows [bB, (b+1)B) in shard order; epochs wrap around."""
    src = _open(dataset)
    n = len(src)
    _, got = _batches(dataset, 8, range(8), -(-n // 8) + 2, shuffle=False)
    flat = np.concatenate([b["tokens"] for b in got])
    for i in range(len(flat)):
        assert np.array_equal(flat[i], src[i % n]["tokens"])


@pytest.mark.heavy
def test_shuffle_is_a_permutation_per_epoch_and_seeded(dataset):
    src = _open(dataset)
    n = len(src)
    keys = {src[i]["tokens"].tobytes(): i for i in range(n)}
    assert len(keys) == n  # rows are distinct, so a row's tokens identify it
    _, got = _batches(dataset, n, range(n), 2, seed=3)
    epochs = [[keys[r.tobytes()] for r in b["tokens"]] for b in got]
    assert sorted(epochs[0]) == list(range(n)) and sorted(epochs[1]) == list(range(n))
    assert epochs[0] != list(range(n)) and epochs[0] != epochs[1]  # shuffled, and reshuffled each epoch
    _, again = _batches(dataset, n, range(n), 1, seed=3)
    _, other = _batches(dataset, n, range(n), 1, seed=4)
    assert np.array_equal(again[0]["tokens"], got[0]["tokens"])
    assert not np.array_equal(other[0]["tokens"], got[0]["tokens"])


_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mistral_jax.data import loader, prepared
    path, batch, rows = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    steps, out = int(sys.argv[4]), sys.argv[5]
    it = loader.GrainBatches([("d", prepared.open_dataset(path), 1.0)], batch, rows, seed=11)
    got = [next(it) for _ in range(steps)]
    np.savez(out, **{f"{k}_{s}": b[k] for s, b in enumerate(got) for k in b})
    print(json.dumps(it.get_state()))
""")


@pytest.mark.heavy
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_disjoint_rows_whose_union_is_the_global_batch(dataset, tmp_path, processes):
    """Real processes, each reading only its rows (a block of the batch, and an interleaved share): their rows
    are disjoint and together give, row for row, the one-process global batch; every process ends at one state."""
    batch, steps = 8, 5
    _, whole = _batches(dataset, batch, range(batch), steps, seed=11)
    for layout in ("block", "interleaved"):
        shares = ([list(range(p * batch // processes, (p + 1) * batch // processes)) for p in range(processes)]
                  if layout == "block" else [list(range(p, batch, processes)) for p in range(processes)])
        assert sorted(r for s in shares for r in s) == list(range(batch))
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, dataset, str(batch), json.dumps(s), str(steps),
                                   str(tmp_path / f"{layout}{p}.npz")], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": os.getcwd()})
                 for p, s in enumerate(shares)]
        states = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert all(st == states[0] for st in states) and states[0]["grain"]["next_index"] == steps
        for p, share in enumerate(shares):
            got = np.load(tmp_path / f"{layout}{p}.npz")
            for s in range(steps):
                for k in whole[s]:
                    assert np.array_equal(got[f"{k}_{s}"], whole[s][k][share]), (layout, p, s, k)


class _Counting:
    """A RowSource whose reads are counted (a resume must read only the rows of the batches it returns)."""

    def __init__(self, src):
        self.src, self.reads = src, 0
        self.fields, self.manifest, self.path = src.fields, src.manifest, src.path

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        self.reads += 1
        return self.src[i]


@pytest.mark.parametrize("step", [10, pytest.param(2000, marks=pytest.mark.heavy)])
def test_resume_gives_the_identical_next_batches_in_constant_time(dataset, step):
    """State after ``step`` batches (through JSON, as the checkpoint keeps it) -> a new loader continues with the
    identical batches, id for id; it reads only those batches' rows (no replay), at step 10 as at step 2,000."""
    rows = [1, 2, 5, 6]
    it, _ = _batches(dataset, 8, rows, step, seed=5, prefetch=1, num_threads=1)
    state = json.loads(json.dumps(it.get_state()))
    assert state["grain"]["next_index"] == step and state["epoch"] == step * 8 // len(_open(dataset))
    want = [next(it) for _ in range(3)]
    counting = _Counting(_open(dataset))
    resumed = loader.GrainBatches([("d", counting, 1.0)], 8, rows, seed=5, prefetch=1, num_threads=1)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    for w, g in zip(want, got, strict=True):
        assert all(np.array_equal(w[k], g[k]) for k in w)
    assert counting.reads <= (3 + 2) * len(rows)  # the batches returned (and at most one more read ahead)


def _mixture(tmp_path_factory, tokenizer_path):
    base = tmp_path_factory.mktemp("mix")
    for name in ("web", "code", "math"):
        write_prepared(str(base / name), [_texts(name, 60)], tokenizer_path, SEQ)
    return base


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory, tokenizer_path):
    return _mixture(tmp_path_factory, tokenizer_path)


def _components(base, weights="web:0.7,code:0.2,math:0.1"):
    spec = ",".join(f"{n}={base / n}" for n in ("web", "code", "math"))
    return [(n, prepared.open_dataset(p), w) for n, p, w in loader.parse_mixture(weights, spec)]


@pytest.mark.heavy
def test_mixture_frequencies_follow_the_weights(mixture_dir):
    """10,000 rows of a 0.7 / 0.2 / 0.1 mixture: each dataset's share within 2 points of its weight."""
    comps = _components(mixture_dir)
    owner = {src[i]["tokens"].tobytes(): n for n, src, _ in comps for i in range(len(src))}
    it = loader.GrainBatches(comps, 100, range(100), seed=0)
    counts = {"web": 0, "code": 0, "math": 0}
    for _ in range(100):
        for r in next(it)["tokens"]:
            counts[owner[r.tobytes()]] += 1
    assert sum(counts.values()) == 10_000
    for name, w in (("web", 0.7), ("code", 0.2), ("math", 0.1)):
        assert abs(counts[name] / 10_000 - w) <= 0.02, counts


def test_changing_the_mixture_on_resume_is_refused_unless_allowed(mixture_dir):
    it = loader.GrainBatches(_components(mixture_dir), 8, range(8), seed=0)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["mixture"] == pytest.approx({"web": 0.7, "code": 0.2, "math": 0.1})
    other = _components(mixture_dir, "web:0.5,code:0.3,math:0.2")
    with pytest.raises(loader.MixtureChanged, match=r"web:0\.7.*web:0\.5.*allow_mixture_change"):
        loader.GrainBatches(other, 8, range(8), seed=0).set_state(state)
    allowed = loader.GrainBatches(other, 8, range(8), seed=0, allow_mixture_change=True)
    allowed.set_state(state)  # continues at global batch 4 of the new mixture's stream
    fresh = loader.GrainBatches(other, 8, range(8), seed=0)
    for _ in range(4):
        next(fresh)
    assert np.array_equal(next(allowed)["tokens"], next(fresh)["tokens"])
    same = loader.GrainBatches(_components(mixture_dir), 8, range(8), seed=0)
    same.set_state(state)
    assert np.array_equal(next(same)["tokens"], next(it)["tokens"])


@pytest.mark.parametrize("mixture, datasets, match", [
    ("web:0.7,code:0.3", "web=/a", r"names 'code', which config.data.datasets does not map"),
    ("web:0,code:0", "web=/a,code=/b", r"sum to 0.0, not a positive number"),
    ("web:-1", "web=/a", r"weight >= 0"),
    ("web:x", "web=/a", r"weight >= 0"),
    ("web:1", "web=/a,code=/b", r"maps \['code'\] but config.data.mixture gives them no weight"),
    ("web:1", "web", r"is not name=path"),
    ("", "web=/a", r"names no dataset"),
])
def test_bad_mixtures_are_one_line_each(mixture, datasets, match):
    with pytest.raises(loader.MixtureError, match=match) as e:
        loader.parse_mixture(mixture, datasets)
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_eval_pass_pads_the_last_batch_and_stops(dataset):
    src = _open(dataset)
    it = loader.GrainBatches([("v", src, 1.0)], 32, range(32), shuffle=False, loop=False)
    got = list(it)
    assert len(got) == -(-len(src) // 32)
    real = sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in got)
    assert real == len(src) and got[-1]["weights"][len(src) % 32:].sum() == 0


# ------------------------------------------------------------------------------------------- checks
def _copy(dataset, tmp_path):
    import shutil

    dest = str(tmp_path / "copy")
    shutil.copytree(dataset, dest)
    return dest


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and "Fix:" in msg, msg
    return msg


def test_checks_name_the_file_and_the_fix(dataset, tmp_path, tokenizer_path, syllable_tokenizer_path):
    from mistral_jax.data.tokenizer import Tokenizer

    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(dataset, seq_len=32)
    assert "seq_len=16" in _one_line(e) and "--config.data.seq_len=16" in str(e.value)
    other = Tokenizer(syllable_tokenizer_path)
    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(dataset, tokenizer=other)
    assert "was tokenized with 'tokenizer.model'" in _one_line(e)
    prepared.open_dataset(dataset, tokenizer=Tokenizer(tokenizer_path), seq_len=SEQ, kind="text")  # fits
    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(dataset, kind="chat")
    assert "holds 'text' data" in _one_line(e)

    missing = _copy(dataset, tmp_path / "m")
    os.remove(os.path.join(missing, prepared.shard_name(1)))
    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(missing)
    assert "part-00001.array_record: shard missing" in _one_line(e)

    corrupt = _copy(dataset, tmp_path / "c")
    shard = os.path.join(corrupt, prepared.shard_name(2))
    size = os.path.getsize(shard)
    open(shard, "wb").write(np.random.default_rng(0).bytes(size))  # garbage of the same size
    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(corrupt)
    assert "part-00002.array_record: not a readable ArrayRecord shard" in _one_line(e)

    truncated = _copy(dataset, tmp_path / "t")
    shard = os.path.join(truncated, prepared.shard_name(0))
    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(truncated)
    assert "truncated or replaced" in _one_line(e)

    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(str(tmp_path / "nowhere"))
    assert "no manifest" in _one_line(e)

    empty = _copy(dataset, tmp_path / "e")
    m = prepared.read_manifest(empty)
    m.update(shards=[], rows=0)
    prepared.write_manifest(empty, {k: v for k, v in m.items() if k not in ("format", "version")})
    with pytest.raises(prepared.PreparedError) as e:
        prepared.open_dataset(empty)
    assert "is empty" in _one_line(e)


@pytest.mark.heavy
@pytest.mark.parametrize("bucket", ["gcs_bucket", "s3_bucket"])
def test_prepared_data_in_a_bucket_reads_the_same_rows(dataset, bucket, request):
    """gs:// shards are read by ArrayRecord itself; s3:// ones through the local cache: the same rows either way."""
    from mistral_jax import storage

    url = storage.join(request.getfixturevalue(bucket), "data/web")
    for root, _, files in os.walk(dataset):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), dataset)
            storage.write_bytes(storage.join(url, rel), open(os.path.join(root, f), "rb").read())
    assert prepared.is_prepared(url)
    local, remote = _open(dataset), prepared.open_dataset(url)
    _, want = _batches(dataset, 8, [0, 3, 4], 6, seed=2)
    _, got = _batches(url, 8, [0, 3, 4], 6, seed=2)
    assert len(remote) == len(local)
    for w, g in zip(want, got, strict=True):
        assert all(np.array_equal(w[k], g[k]) for k in w)
