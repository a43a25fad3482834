"""Prepared data written by ``data/prepare.py`` (and ``prepare_beam.py``): the rows are the packer's rows over the
tokenizer's ids (checked against sentencepiece itself), every input kind gives the same rows, byte ranges give each
line once, the output does not depend on workers, interruption or the runner, and bad arguments are one line.

Rows are read back through the reader of the format (``prepared.open_dataset``), not through the writer's code.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mistral_jax import storage
from mistral_jax.data import chat, documents, preference, prepared
from mistral_jax.data.corpus import TRAIN
from mistral_jax.data.pipeline import DataError, pack_documents
from mistral_jax.data.prepare import DELAY_ENV, PrepareError, prepare
from mistral_jax.data.tokenizer import Tokenizer, named_tokenizer_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "mistral_jax", "data", "corpus")
TOK = "mistral:v1"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOK)


def texts(n: int = 30) -> list[str]:
    with open(TRAIN) as f:
        return [json.loads(line)["text"] for line in f][:n]


def write_jsonl(path, recs) -> str:
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def rows_of(dest: str, **kw) -> list[dict[str, np.ndarray]]:
    src = prepared.open_dataset(dest, **kw)
    return [src[i] for i in range(len(src))]


def same_rows(a, b) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


def tree(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# --------------------------------------------------------------------------------------------------- rows
def test_text_rows_are_sentencepiece_ids_packed(tmp_path, tok):
    import sentencepiece as spm

    docs = texts(25)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    m = prepare(src, str(tmp_path / "out"), tokenizer=TOK, seq_len=64, workers=1, progress=False)
    rows = rows_of(str(tmp_path / "out"), tokenizer=tok, seq_len=64, kind="text")
    sp = spm.SentencePieceProcessor(model_file=named_tokenizer_path(TOK))
    ids = [[sp.bos_id()] + sp.encode(t) + [sp.eos_id()] for t in docs]
    same_rows(rows, list(pack_documents(ids, 64)))
    # the segments, read in order, are the documents: inputs ids[:-1] continued across rows
    flat = [int(t) for r in rows for t, s in zip(r["tokens"], r["segment_ids"], strict=True) if s > 0]
    assert flat == [i for d in ids for i in d[:-1]]
    assert m["documents"] == 25 and m["rows"] == len(rows)
    assert m["tokens"] == sum(len(d) - 1 for d in ids) == sum(int((r["segment_ids"] > 0).sum()) for r in rows)
    assert m["sources"] == [documents.fingerprint(src)]
    assert m["tokenizer"] == prepared.tokenizer_identity(tok) and m["add_bos"] and m["add_eos"] and m["packed"]


def test_unpacked_rows_start_each_document(tmp_path, tok):
    docs = texts(6)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    prepare(src, str(tmp_path / "out"), tokenizer=TOK, seq_len=128, pack=False, add_eos=False, workers=1,
            progress=False)
    want = [r for t in docs for r in pack_documents([tok.encode(t, bos=True, eos=False)], 128)]
    same_rows(rows_of(str(tmp_path / "out")), want)


def _kinds(tmp_path, docs) -> dict[str, str]:
    """The same documents as every supported input kind: {kind: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    recs = [{"text": t, "id": i} for i, t in enumerate(docs)]
    lines = "".join(json.dumps(r) + "\n" for r in recs).encode()
    txt = "".join(t + "\n" for t in docs).encode()
    d = tmp_path / "kinds"
    d.mkdir()
    out = {"jsonl": write_jsonl(d / "a.jsonl", recs)}
    (d / "b.json").write_text(json.dumps(recs, indent=1))
    (d / "c.txt").write_bytes(txt)
    (d / "d.jsonl.gz").write_bytes(gzip.compress(lines))
    (d / "e.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(txt))
    (d / "f.json.gz").write_bytes(gzip.compress(json.dumps(recs).encode()))
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), str(d / "g.parquet"), row_group_size=3)
    out.update(json=str(d / "b.json"), txt=str(d / "c.txt"), jsonl_gz=str(d / "d.jsonl.gz"),
               txt_zst=str(d / "e.txt.zst"), json_gz=str(d / "f.json.gz"), parquet=str(d / "g.parquet"))
    return out


def test_every_input_kind_reads_the_same_documents(tmp_path):
    docs = [t.replace("\n", " ") for t in texts(10)]  # .txt: one document per line
    kinds = _kinds(tmp_path, docs)
    for kind, path in kinds.items():
        got = [t for u in documents.units(path) for t in documents.read_unit(u)]
        assert got == docs, kind
        recs = [r for u in documents.units(path) for r in documents.read_records(u)]
        assert [r["text"] for r in recs] == docs, kind
    # the directory, a glob and a comma-separated list: every file once, sorted by path
    want = sorted(kinds.values())
    assert [u.path for u in documents.units(str(tmp_path / "kinds"))] == want
    assert [u.path for u in documents.units(str(tmp_path / "**" / "*.*"))] == want
    assert [u.path for u in documents.units(f"{kinds['txt']},{tmp_path / 'kinds'}")] == \
        [kinds["txt"]] + [p for p in want if p != kinds["txt"]]


def test_every_input_kind_prepares_the_same_rows(tmp_path):
    docs = [t.replace("\n", " ") for t in texts(10)]
    want = None
    for kind, path in _kinds(tmp_path, docs).items():
        dest = str(tmp_path / f"out-{kind}")
        prepare(path, dest, tokenizer=TOK, seq_len=96, workers=1, progress=False)
        rows = rows_of(dest)
        if want is None:
            want = rows
        same_rows(rows, want)


@pytest.mark.heavy  # datasets' save_to_disk imports torch where it is installed (not in the light tier)
def test_hf_save_to_disk_directory(tmp_path):
    import datasets

    docs = [t.replace("\n", " ") for t in texts(10)]
    hf = tmp_path / "data" / "hf"
    datasets.Dataset.from_dict({"text": docs, "id": list(range(10))}).save_to_disk(str(hf), max_shard_size="2KB")
    write_jsonl(tmp_path / "data" / "z.jsonl", [{"text": t} for t in docs])
    us = documents.units(str(hf))
    assert len(us) > 1 and all(u.path.endswith(".arrow") for u in us)  # one unit per Arrow file
    assert [t for u in us for t in documents.read_unit(u)] == datasets.load_from_disk(str(hf))["text"] == docs
    assert [r["id"] for u in us for r in documents.read_records(u)] == list(range(10))
    # inside a directory: its Arrow files, never its own .json files
    assert [u.path for u in documents.units(str(tmp_path / "data"))] == [u.path for u in us] + \
        [str(tmp_path / "data" / "z.jsonl")]
    prepare(str(hf), str(tmp_path / "a"), tokenizer=TOK, seq_len=96, workers=1, progress=False)
    prepare(str(tmp_path / "data" / "z.jsonl"), str(tmp_path / "b"), tokenizer=TOK, seq_len=96, workers=1,
            progress=False)
    assert len(rows_of(str(tmp_path / "a"))) > len(rows_of(str(tmp_path / "b")))  # one packing per Arrow file
    same_rows([r for u in us for r in pack_documents([Tokenizer(TOK).encode(t, eos=True)
                                                     for t in documents.read_unit(u)], 96)],
              rows_of(str(tmp_path / "a")))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"is an HF DatasetDict \(splits \['train'\]\).*dd/train"):
        documents.units(str(tmp_path / "dd"))


def test_byte_ranges_give_every_line_once(tmp_path):
    rng = np.random.default_rng(0)
    recs = [{"text": "x" * int(n) + f" {i}"} for i, n in enumerate(rng.integers(0, 40, 60))]
    path = write_jsonl(tmp_path / "big.jsonl", recs)
    size = os.path.getsize(path)
    want = [r["text"] for r in recs]
    for shard_bytes in (1, 7, 41, 42, 43, 500, size - 1, size):
        us = documents.units(path, shard_bytes=shard_bytes)
        assert len(us) == -(-size // shard_bytes)
        assert us[0].start == 0 and us[-1].end == size if len(us) > 1 else us == [documents.Unit(path)]
        got = [t for u in us for t in documents.read_unit(u)]
        assert got == want, shard_bytes
    # txt, empty lines kept as (empty) documents, exactly once
    lines = ["a", "", "bb", "", "", "ccc", "d" * 30, ""]
    txt = tmp_path / "t.txt"
    txt.write_text("".join(x + "\n" for x in lines))
    for shard_bytes in (1, 2, 3, 5, 100):
        assert [t for u in documents.units(str(txt), shard_bytes=shard_bytes) for t in documents.read_unit(u)] == lines


def test_byte_range_prepare_counts_add_up(tmp_path):
    docs = texts(40)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs] + [{"text": "  "}, {"text": 3}])
    dest = str(tmp_path / "out")
    m = prepare(src, dest, tokenizer=TOK, seq_len=128, shard_bytes=8_000, workers=1, progress=False)
    assert m["units"] == len(documents.units(src, shard_bytes=8_000)) > 3
    assert m["documents"] == 40 and m["skipped"]["empty"] == 1
    assert m["rows"] == sum(s["rows"] for s in m["shards"]) == len(prepared.open_dataset(dest))
    assert m["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert m["documents"] == sum(s["documents"] for s in m["shards"])
    assert m["skipped"]["short"] == 0 and m["empty_units"] == m["units"] - len(m["shards"])


def test_chat_rows_are_chat_pack_rows(tmp_path, tok):
    src = os.path.join(CORPUS, "instruct_train.jsonl")
    m = prepare(src, str(tmp_path / "out"), tokenizer=TOK, seq_len=64, format="chat", workers=1, progress=False)
    with open(src) as f:
        convs = [chat.to_messages(json.loads(line)) for line in f if line.strip()]
    want = list(chat.pack([chat.render(c, tok) for c in convs], 64, tok.pad_id))
    same_rows(rows_of(str(tmp_path / "out"), kind="chat"), want)
    assert m["documents"] == len(convs) and m["kind"] == "chat"


def test_preference_rows_are_pack_pairs_rows(tmp_path, tok):
    src = os.path.join(CORPUS, "preference_train.jsonl")
    m = prepare(src, str(tmp_path / "out"), tokenizer=TOK, seq_len=48, format="preference", pairs_per_row=2,
                workers=1, progress=False)
    with open(src) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    stats = preference.PairStats()
    want = list(preference.pack_pairs([preference.render_pair(preference.to_pair(r), tok) for r in recs], 48, 2,
                                      tok.pad_id, stats))
    got = rows_of(str(tmp_path / "out"), kind="preference")
    same_rows(got, want)
    assert got[0]["tokens"].shape == (2, 48) and got[0]["pair_mask"].shape == (2,)
    assert m["documents"] == stats.pairs - stats.dropped and m["skipped"]["dropped"] == stats.dropped


def test_invalid_chat_records_skipped_or_refused(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "assistant", "content": "first"}]}
    src = write_jsonl(tmp_path / "c.jsonl", [good, bad, good])
    with pytest.raises(DataError, match=r"c.jsonl: record 1: conversation 1.*skip_invalid"):
        prepare(src, str(tmp_path / "a"), tokenizer=TOK, seq_len=32, format="chat", workers=1, progress=False)
    m = prepare(src, str(tmp_path / "b"), tokenizer=TOK, seq_len=32, format="chat", skip_invalid=True, workers=1,
                progress=False)
    assert m["documents"] == 2 and m["skipped"]["invalid"] == 1


# --------------------------------------------------------------------------------------------------- errors
def test_bad_arguments_are_one_line(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    kw = dict(tokenizer=TOK, workers=1, progress=False)
    cases = [
        (dict(inputs="", seq_len=8), DataError, "no inputs given"),
        (dict(inputs=str(tmp_path / "missing.jsonl"), seq_len=8), DataError, "does not exist"),
        (dict(inputs=src, seq_len=0), PrepareError, "seq_len=0: must be an integer >= 1"),
        (dict(inputs=src, seq_len=1, format="chat"), PrepareError, "seq_len=1: must be an integer >= 2"),
        (dict(inputs=src, seq_len=8, format="sft"), PrepareError, "format='sft' is not a prepared kind"),
        (dict(inputs=src, seq_len=8, on_decode_error="ignore"), PrepareError, "on_decode_error='ignore'"),
        (dict(inputs=src, seq_len=8, tokenizer=str(tmp_path / "no.model")), PrepareError, "cannot be loaded"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match) as e:
            prepare(args.pop("inputs"), str(tmp_path / "out"), **{**kw, **args})
        assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match=r"exists and is not a prepare's directory.*notes.txt"):
        prepare(src, str(tmp_path / "other"), seq_len=8, **kw)
    prepare(src, str(tmp_path / "done"), seq_len=8, **kw)
    with pytest.raises(PrepareError, match=r"holds a prepare with other arguments \(differing: options.seq_len\b"):
        prepare(src, str(tmp_path / "done"), seq_len=16, **kw)
    prepare(src, str(tmp_path / "done"), seq_len=8, **kw)  # the same arguments: accepted (nothing to redo)


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    from mistral_jax import cli
    from mistral_jax.cli import prepare as cli_prepare

    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    base = ["--inputs", src, "--dest", str(tmp_path / "o"), "--tokenizer", TOK]
    for argv, match in [(base + ["--seq_len", "x"], "--seq_len='x' is not an integer"),
                        (base + ["--seq_len", "8", "--format", "dpo"], "--format='dpo' is not a prepared kind"),
                        (base + ["--seq_len", "8", "--pack", "maybe"], "--pack='maybe' is not a boolean"),
                        (base + ["--seq_len", "8", "--runner", "spark"], "--runner='spark' is not a runner"),
                        (base + ["--seq_len", "8", "--", "--project=p"], "takes no Beam arguments")]:
        with pytest.raises(cli.UsageError, match=match):
            cli_prepare.main(argv)


def test_decode_errors_in_a_byte_range(tmp_path):
    p = tmp_path / "l.txt"
    p.write_bytes(b"good line\n" * 5 + b"caf\xe9\n" + b"more\n" * 5)
    us = documents.units(str(p), shard_bytes=30)
    with pytest.raises(DataError, match=r"l.txt \(bytes 30-60\):\d: not valid UTF-8"):
        [t for u in us for t in documents.read_unit(u, on_decode_error="error")]
    assert [t for u in us for t in documents.read_unit(u)][5] == "caf\ufffd"


# --------------------------------------------------------------------------------------------------- runs
@pytest.mark.heavy  # a fork and a spawn pool
def test_workers_do_not_change_the_output(tmp_path, monkeypatch):
    import multiprocessing

    from mistral_jax.data import prepare as prepare_mod

    src = os.path.join(CORPUS, "pydoc_train.jsonl")
    for name, w in (("one", 1), ("fork", 2), ("spawn", 2)):
        if name != "one":
            monkeypatch.setattr(prepare_mod, "pool_context", lambda m=name: multiprocessing.get_context(m))
        prepare(src, str(tmp_path / name), tokenizer=TOK, seq_len=128, shard_bytes=60_000, workers=w,
                progress=False)
    a = tree(str(tmp_path / "one"))
    assert a == tree(str(tmp_path / "fork")) == tree(str(tmp_path / "spawn"))
    assert sum(k.startswith("shards/") for k in a) >= 7


@pytest.mark.heavy  # a subprocess that starts JAX
def test_workers_fork_only_before_jax_starts():
    code = ("from mistral_jax.data.prepare import pool_context as c\n"
            "a = c().get_start_method()\nimport jax\njax.devices()\nprint(a, c().get_start_method())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fork", "spawn"]


def _cli_argv(src: str, dest: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mistral_jax.data.prepare", "--inputs", src, "--dest", dest, "--tokenizer", TOK,
            "--seq_len", "128", "--shard_bytes", "40000", "--workers", "1", "--no_progress", *extra]


@pytest.mark.heavy  # three CLI subprocesses
def test_killed_prepare_resumes_to_the_same_output(tmp_path):
    src = os.path.join(CORPUS, "pydoc_train.jsonl")
    env = {**os.environ, "PYTHONPATH": ROOT}
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    subprocess.run(_cli_argv(src, full), env=env, check=True, capture_output=True)
    n_units = len(documents.units(src, shard_bytes=40_000))
    proc = subprocess.Popen(_cli_argv(src, cut), env={**env, DELAY_ENV: "0.3"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = os.path.join(cut, "progress")
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [n for n in os.listdir(progress) if n.startswith("part-")] if os.path.isdir(progress) else []
        if len(done) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [n for n in os.listdir(progress) if n.startswith("part-")]
    assert 3 <= len(done) < n_units and not os.path.exists(os.path.join(cut, "manifest.json"))
    kept = {n: os.stat(os.path.join(cut, "shards", n.replace("json", "array_record"))).st_mtime_ns for n in done}
    r = subprocess.run(_cli_argv(src, cut), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tree(cut) == tree(full)  # shards, progress and manifest, byte for byte; no partial file left
    for n, mtime in kept.items():  # finished shards were kept, not rewritten
        assert os.stat(os.path.join(cut, "shards", n.replace("json", "array_record"))).st_mtime_ns == mtime
    r = subprocess.run(_cli_argv(src, cut, "--add_eos", "false"), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "differing: options.add_eos" in r.stderr


@pytest.mark.heavy  # a Beam pipeline
def test_beam_direct_runner_equals_local(tmp_path):
    from mistral_jax.data.prepare_beam import run_beam

    src = os.path.join(CORPUS, "pydoc_train.jsonl") + "," + os.path.join(CORPUS, "pydoc_validation.jsonl")
    local = prepare(src, str(tmp_path / "local"), tokenizer=TOK, seq_len=128, shard_bytes=100_000, workers=1,
                    progress=False)
    beam = run_beam(src, str(tmp_path / "beam"), tokenizer=TOK, seq_len=128, shard_bytes=100_000)
    assert beam == local
    assert tree(str(tmp_path / "beam")) == tree(str(tmp_path / "local"))


def test_bucket_destination(tmp_path, gcs_bucket, tok):
    docs = texts(20)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    dest = storage.join(gcs_bucket, "prepared", "web")
    m = prepare(src, dest, tokenizer=TOK, seq_len=64, shard_bytes=20_000, workers=1, progress=False)
    prepare(src, str(tmp_path / "local"), tokenizer=TOK, seq_len=64, shard_bytes=20_000, workers=1, progress=False)
    assert m == prepared.read_manifest(str(tmp_path / "local"))
    same_rows(rows_of(dest, tokenizer=tok, seq_len=64), rows_of(str(tmp_path / "local")))
    assert storage.path(storage.join(dest, "progress", "part-00000.json")).is_file()
    # resuming into the bucket: nothing to redo, the same manifest
    assert prepare(src, dest, tokenizer=TOK, seq_len=64, shard_bytes=20_000, workers=1, progress=False) == m


def test_bucket_input_glob_and_byte_ranges(tmp_path, gcs_bucket):
    docs = texts(5)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    fs = storage.filesystem("gs")
    fs.put_file(src, storage.join(gcs_bucket, "raw", "d.jsonl"))
    url = storage.join(gcs_bucket, "raw", "**", "*.jsonl")
    us = documents.units(url, shard_bytes=3000)
    assert len(us) > 1 and all(u.path == storage.join(gcs_bucket, "raw", "d.jsonl") for u in us)
    assert [t for u in us for t in documents.read_unit(u)] == docs
    assert documents.fingerprint(us[0].path)["sha256"] == documents.fingerprint(src)["sha256"]
