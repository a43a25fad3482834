"""Data pipeline: sources, bad input, packing, deterministic shuffling, per-process sharding, resumable state."""

import json
import logging

import numpy as np
import pytest

from mistral_jax.data import pipeline as P
from mistral_jax.data.corpus import TRAIN, VALIDATION


@pytest.fixture(scope="module")
def tok(corpus_tokenizer):
    return corpus_tokenizer  # conftest.py: 512 pieces trained on the bundled corpus, shared by the session


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _eq(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bundled corpus
def test_bundled_corpus_is_split_and_attributed():
    import os

    from mistral_jax.data import corpus

    train, val = P.open_source(TRAIN), P.open_source(VALIDATION)
    assert len(train) > 10 * len(val) > 0
    assert not set(train.texts) & set(val.texts)
    size = os.path.getsize(TRAIN) + os.path.getsize(VALIDATION)
    assert 200_000 < size < 1_500_000
    for name in ("LICENSE", "ATTRIBUTION"):
        text = open(os.path.join(corpus.HERE, name), encoding="utf-8").read()
        assert "Python Software Foundation" in text


# --------------------------------------------------------------------------- sources and bad input
def test_local_formats_dir_and_glob(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ["doc one", "", "doc two"])
    (tmp_path / "b.txt").write_text("line doc\n\nsecond line doc\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "array doc"}, {"text": "array doc 2"}]), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["pq doc"], "other": [1]}), str(tmp_path / "d.parquet"))
    src = P.open_source(str(tmp_path))
    assert src.texts == ["doc one", "doc two", "line doc", "second line doc", "array doc", "array doc 2", "pq doc"]
    assert P.open_source(str(tmp_path / "*.txt")).texts == ["line doc", "second line doc"]


@pytest.mark.parametrize("spec, match", [
    ("/nonexistent/train.jsonl", "does not exist"),
    ("./missing.parquet", "does not exist"),
    ("/nonexistent/*.jsonl", "matches no files"),
])
def test_missing_inputs(spec, match):
    with pytest.raises(P.DataError, match=match):
        P.open_source(spec)


def test_empty_and_malformed_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(P.DataError, match="no non-empty documents"):
        P.open_source(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(P.DataError, match=r"bad.jsonl:2: malformed JSON"):
        P.open_source(str(bad))
    nofield = _write_jsonl(tmp_path / "f.jsonl", ["x"])
    with pytest.raises(P.DataError, match=r"no 'content' field \(has \['text'\]\).*text_field"):
        P.open_source(nofield, text_field="content")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(P.DataError, match="holds no"):
        P.open_source(str(tmp_path / "empty_dir"))
    with pytest.raises(P.DataError, match="config.data.train is empty"):
        P.open_source("")


def test_a_directory_of_compressed_line_files_is_files_like_prepare_reads_it(tmp_path):
    """``data.train`` and prepare agree on what a directory holds: ``.jsonl.zst`` / ``.txt.gz`` count."""
    import gzip

    import zstandard

    from mistral_jax.data import documents

    d = tmp_path / "zdir"
    d.mkdir()
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "alpha beta"}\n'))
    (d / "b.txt.gz").write_bytes(gzip.compress(b"gamma delta\n"))
    (d / "notes.md").write_text("not data")
    assert P.is_files(str(d))
    assert sorted(P._expand(str(d))) == sorted(documents.expand(str(d))) == [str(d / "a.jsonl.zst"),
                                                                               str(d / "b.txt.gz")]
    assert sorted(P.open_source(str(d)).texts) == ["alpha beta", "gamma delta"]


def test_non_utf8_replace_warns_with_count_or_errors(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good line\n" + "caf\xe9 one\n".encode("latin-1") + b"ok\n" + b"\xff\xfe two\n")
    with caplog.at_level(logging.WARNING):
        src = P.open_source(str(path))
    assert src.texts == ["good line", "caf\ufffd one", "ok", "\ufffd\ufffd two"]
    msgs = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert len(msgs) == 1 and "2 line(s)" in msgs[0] and "first: line 2" in msgs[0]
    with pytest.raises(P.DataError, match=r"latin1.txt:2: not valid UTF-8"):
        P.open_source(str(path), on_decode_error="error")


def test_hub_name_offline_fails_naming_dataset_and_local_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(P.DataError) as e:
        P.open_source("someorg/surely-not-cached-dataset", split="train")
    msg = str(e.value)
    assert "someorg/surely-not-cached-dataset" in msg and "--config.data.train=/path/train.jsonl" in msg


# --------------------------------------------------------------------------- packing
def test_packing_rows_segments_positions_and_targets(tok, tmp_path):
    texts = ["alpha beta gamma", "x", "def f(x): return x + 1", "a much longer document " * 6]
    src = P.open_source(_write_jsonl(tmp_path / "d.jsonl", texts))
    it = P.PackedBatches(src, tok, seq_len=16, batch_size=2, shuffle=False, loop=False)
    batches = list(it)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    stream = []  # rebuild every document's token list from the (input, target) pairs of its pieces
    for r in range(rows["tokens"].shape[0]):
        for s in np.unique(rows["segment_ids"][r]):
            if s == 0:
                continue
            m = rows["segment_ids"][r] == s
            np.testing.assert_array_equal(rows["positions"][r][m], np.arange(m.sum()))  # restart per piece
            assert rows["weights"][r][m].min() == 1.0
            tokens, targets = rows["tokens"][r][m], rows["targets"][r][m]
            np.testing.assert_array_equal(tokens[1:], targets[:-1])  # targets are the next tokens
            stream.append((tokens, targets))
    pad = rows["segment_ids"] == 0
    assert pad.any() and (rows["weights"][pad] == 0).all()
    assert not pad[:-1].any()  # only the last row (end of a non-looping source) is padded
    expected = [tok.encode(t, bos=True, eos=True) for t in texts]
    flat_inputs = np.concatenate([t for t, _ in stream])
    flat_targets = np.concatenate([g for _, g in stream])
    np.testing.assert_array_equal(flat_inputs, np.concatenate([e[:-1] for e in expected]))
    np.testing.assert_array_equal(flat_targets, np.concatenate([e[1:] for e in expected]))
    assert expected[0][0] == tok.bos_id and expected[0][-1] == tok.eos_id


def test_add_bos_eos_flags_change_the_stream(tok, tmp_path):
    src = P.open_source(_write_jsonl(tmp_path / "d.jsonl", ["hello world"]))
    with_ = next(P.PackedBatches(src, tok, 32, 1, shuffle=False, loop=False))
    without = next(P.PackedBatches(src, tok, 32, 1, shuffle=False, loop=False, add_bos=False, add_eos=False))
    assert with_["tokens"][0, 0] == tok.bos_id and tok.eos_id in with_["targets"][0]
    assert tok.bos_id not in without["tokens"][0] and tok.eos_id not in without["targets"][0]
    assert with_["weights"].sum() == without["weights"].sum() + 2


# --------------------------------------------------------------------------- order and resume
def test_shuffle_is_deterministic_per_seed_and_epoch(tok):
    src = P.open_source(TRAIN)
    a = _take(P.PackedBatches(src, tok, 32, 2, seed=3), 3)
    b = _take(P.PackedBatches(src, tok, 32, 2, seed=3), 3)
    c = _take(P.PackedBatches(src, tok, 32, 2, seed=4), 3)
    plain = _take(P.PackedBatches(src, tok, 32, 2, shuffle=False), 1)
    assert all(_eq(x, y) for x, y in zip(a, b, strict=True))
    assert not _eq(a[0], c[0])
    np.testing.assert_array_equal(plain[0]["tokens"][0][:8], tok.encode(src.texts[0])[:8])
    order0 = list(src.documents(0, 0, 3, True, 0, 1))
    order1 = list(src.documents(1, 0, 3, True, 0, 1))
    assert sorted(order0) == sorted(order1) == sorted(src.texts) and order0 != order1


def test_process_sharding_is_disjoint_and_complete(tok):
    src = P.open_source(VALIDATION)
    parts = [list(src.documents(0, 0, 7, True, p, 3)) for p in range(3)]
    assert sum(len(p) for p in parts) == len(src)
    assert sorted(sum(parts, [])) == sorted(src.texts)
    b0 = next(P.PackedBatches(src, tok, 32, 2, seed=7, process_index=0, process_count=3))
    b1 = next(P.PackedBatches(src, tok, 32, 2, seed=7, process_index=1, process_count=3))
    assert not _eq(b0, b1)


def test_resume_mid_document_and_across_epochs(tok, tmp_path):
    src = P.open_source(_write_jsonl(tmp_path / "d.jsonl", [f"document number {i} " * (i + 1) for i in range(5)]))
    it = P.PackedBatches(src, tok, 16, 2, seed=1)
    _take(it, 3)
    state = it.get_state()
    assert state["offset"] > 0 or state["index"] > 0
    expected = _take(it, 12)  # long enough to cross into the next epochs
    assert it.get_state()["epoch"] >= 1
    resumed = P.PackedBatches(src, tok, 16, 2, seed=1)
    resumed.set_state(json.loads(json.dumps(state)))  # survives the JSON round trip of the checkpoint
    assert all(_eq(x, y) for x, y in zip(expected, _take(resumed, 12), strict=True))


def test_changed_settings_warn_on_resume(tok, caplog):
    src = P.open_source(VALIDATION)
    state = P.PackedBatches(src, tok, 32, 2, seed=1).get_state()
    with caplog.at_level(logging.WARNING):
        P.PackedBatches(src, tok, 32, 2, seed=2).set_state(state)
    assert any("data settings changed" in r.getMessage() for r in caplog.records)


def test_file_without_utf8_text_is_refused(tmp_path, caplog):
    """Random bytes are ~45% undecodable: refused (naming the file, the share and the fix), not trained on with a
    warning; text in Latin-1 (a few % bad bytes) still loads with the warning."""
    noise = tmp_path / "noise.txt"
    noise.write_bytes(np.random.default_rng(0).bytes(20_000))
    for policy in P.DECODE_POLICIES:
        with pytest.raises(P.DataError, match=r"noise.txt.*not valid UTF-8.*Fix: re-encode the file as UTF-8"):
            P.open_source(str(noise), on_decode_error=policy)
    with pytest.raises(P.DataError, match=r"noise.txt: \d+ of its 20000 bytes \(4\d%, in \d+ of \d+ lines\)"):
        P.load_texts(str(noise))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("".join(f"le café numéro {i} est à côté de l'église\n" for i in range(50)).encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        src = P.open_source(str(latin1))
    assert len(src.texts) == 50 and "caf\ufffd" in src.texts[0]
    assert any("50 line(s) are not valid UTF-8" in r.getMessage() for r in caplog.records)
