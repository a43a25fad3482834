"""Data, tokenizers and the inference / eval tools on buckets: a ``gs://`` / ``s3://`` path reads as the local file.

Everything runs against the emulators of ``tests/emulators.py`` (fake-gcs-server, moto), through the project's own
path layer (``mistral_jax.storage``): nothing is mocked. Files are copied to a bucket with fsspec's ``put_file``, and
each test compares what the project reads from the bucket with what it reads from the local copy: the same
documents, batches, token ids, tokenizer bytes, eval files. Bad bucket paths (a missing bucket, a missing object, a
stopped endpoint) fail in one line with the fix, before anything loads.
The end-to-end tests load a model (generate, the server, eval.py) or train from a bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mistral_jax import storage
from mistral_jax.data import chat, pipeline, preference
from mistral_jax.data.corpus import TRAIN
from mistral_jax.data.tokenizer import Tokenizer
from tests.helpers import mc_task_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def upload(local: str, url: str) -> str:
    """Copy a local file or directory tree to the bucket path ``url`` (fsspec ``put_file``); returns ``url``."""
    fs = storage.filesystem(storage.url_scheme(url))
    if os.path.isfile(local):
        fs.put_file(local, url)
        return url
    for root, _, names in os.walk(local):
        for name in names:
            src = os.path.join(root, name)
            fs.put_file(src, storage.join(url, os.path.relpath(src, local).replace(os.sep, "/")))
    return url


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _cli(module, argv, capsys) -> tuple[int, str]:
    """A tool's ``main(argv)`` as its console script runs it (``cli.run``): (exit status, stderr)."""
    from mistral_jax import cli

    try:
        cli.run(lambda: module.main(argv), module.PROG)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- text data
@pytest.fixture(scope="module")
def text_tree(tmp_path_factory):
    """A local data directory holding every supported format (and a file of another kind, which is skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(TRAIN, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:60]
    root = tmp_path_factory.mktemp("text_tree") / "data"
    (root / "sub").mkdir(parents=True)
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:20])
    (root / "b.json").write_text(json.dumps([{"text": t} for t in texts[20:30]]), encoding="utf-8")
    (root / "sub" / "c.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[30:45]) + "\n",
                                        encoding="utf-8")
    pq.write_table(pa.table({"text": texts[45:60]}), root / "sub" / "d.parquet")
    (root / "sub" / "notes.bin").write_bytes(b"\x00\x01 not data")
    return str(root)


def _batches(source, tok, n=3, seq_len=32):
    it = pipeline.PackedBatches(source, tok, seq_len, 4, seed=3)
    return [next(it) for _ in range(n)]


@pytest.mark.heavy  # prepares the tree twice (local, bucket): seconds
@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_text_data_from_a_bucket_gives_the_local_documents_and_batches(where, text_tree, corpus_tokenizer, request):
    url = upload(text_tree, storage.join(request.getfixturevalue(f"{where}_bucket"), "data"))
    for rel in ("", "a.jsonl", "b.json", "sub/c.txt", "sub/d.parquet", "**/*.jsonl", "*/*.t?t", "**/*.parquet"):
        local = pipeline.open_source(os.path.join(text_tree, rel) if rel else text_tree)
        remote = pipeline.open_source(storage.join(url, rel) if rel else url)
        assert isinstance(remote, pipeline.LocalSource) and remote.texts == local.texts, rel
        assert [f[len(url):] for f in remote.files] == [f[len(text_tree):] for f in local.files], rel
    whole_local, whole_remote = pipeline.open_source(text_tree), pipeline.open_source(url)
    assert len(whole_remote.files) == 4 and len(whole_remote) == 60  # notes.bin: of no supported format
    for a, b in zip(_batches(whole_local, corpus_tokenizer), _batches(whole_remote, corpus_tokenizer), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # the trainer's path for files: prepared once into the cache, then the Grain loader: the same rows from a bucket
    from mistral_jax.data import loader, prepared
    from mistral_jax.training.run import base_config

    data_cfg = base_config().data
    data_cfg.seq_len = 32
    cached = [loader.cached_prepare(spec, data_cfg, corpus_tokenizer, "text") for spec in (text_tree, url)]
    assert cached[0] != cached[1]  # keyed by the files (here their places), the tokenizer and the options
    rows = [loader.GrainBatches([("d", prepared.open_dataset(c), 1.0)], 4, [0, 3], seed=1) for c in cached]
    for _ in range(2):
        a, b = next(rows[0]), next(rows[1])
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert loader.cached_prepare(url, data_cfg, corpus_tokenizer, "text") == cached[1]  # reused, not prepared again
    assert pipeline.load_texts(storage.join(url, "a.jsonl"), limit=5) == whole_local.texts[:5]


def test_bad_data_in_a_bucket_is_named_in_one_line(gcs_bucket):
    storage.write_bytes(storage.join(gcs_bucket, "bad.jsonl"), b'{"text": "fine"}\n{"text": broken\n')
    storage.write_bytes(storage.join(gcs_bucket, "latin1.txt"), "caf\u00e9 ok\n".encode("latin-1"))
    cases = [
        (storage.join(gcs_bucket, "bad.jsonl"), {}, f"{gcs_bucket}/bad.jsonl:2: malformed JSON line"),
        (storage.join(gcs_bucket, "latin1.txt"), {"on_decode_error": "error"}, f"{gcs_bucket}/latin1.txt:1: not valid"),
        (storage.join(gcs_bucket, "missing.jsonl"), {}, f"data file '{gcs_bucket}/missing.jsonl' does not exist"),
        (storage.join(gcs_bucket, "*.parquet"), {}, "matches no files"),
        (f"gs://no-such-bucket-{os.getpid()}/x.jsonl", {}, "does not exist. Fix: create it"),
        ("hdfs://nn/x.jsonl", {}, "is a hdfs:// URL"),
    ]
    for spec, kw, expected in cases:
        with pytest.raises(pipeline.DataError) as e:
            pipeline.open_source(spec, **kw)
        assert expected in str(e.value) and "Fix:" in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    # the "replace" policy reads the same text as from a local file (U+FFFD for the bad byte)
    assert pipeline.open_source(storage.join(gcs_bucket, "latin1.txt")).texts == ["caf\ufffd ok"]


def test_a_stopped_endpoint_fails_fast_in_one_line(gcs_bucket, monkeypatch):
    from tests.emulators import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for load, error in ((lambda u: pipeline.open_source(u), pipeline.DataError),
                        (lambda u: list(chat.load_conversations(u)), storage.StorageError),
                        (lambda u: list(preference.load_records(u)), storage.StorageError),
                        (Tokenizer, storage.StorageError)):
        start = time.time()
        with pytest.raises(error) as e:
            load(storage.join(gcs_bucket, "x.jsonl"))
        assert time.time() - start < 5
        assert "connection refused" in str(e.value) and "STORAGE_EMULATOR_HOST" in str(e.value)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ chat / preference
def test_chat_and_preference_data_from_a_bucket(gcs_bucket, tmp_path):
    data = tmp_path / "data"
    (data / "chat").mkdir(parents=True)
    shutil.copy(chat.BUNDLED_TRAIN, data / "chat" / "b.jsonl")
    shutil.copy(chat.BUNDLED_VALIDATION, data / "chat" / "a.jsonl")
    shutil.copy(preference.BUNDLED_TRAIN, data / "prefs.jsonl")
    url = upload(str(data), storage.join(gcs_bucket, "data"))
    for rel in ("chat", "chat/b.jsonl", "chat/*.jsonl"):  # a directory (its .json* files, sorted), a file, a glob
        assert list(chat.load_conversations(storage.join(url, rel))) == list(
            chat.load_conversations(os.path.join(data, rel)))
    assert len(list(chat.load_conversations(storage.join(url, "chat")))) > len(list(
        chat.load_conversations(chat.BUNDLED_TRAIN)))
    assert list(preference.load_records(storage.join(url, "prefs.jsonl"))) == list(
        preference.load_records(preference.BUNDLED_TRAIN))
    for load in (chat.load_conversations, preference.load_records):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            list(load(storage.join(url, "missing.jsonl")))


# ------------------------------------------------------------------------------------------------ tokenizers
@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_sentencepiece_tokenizer_from_a_bucket_gives_the_local_ids(where, tokenizer_path, request, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    bucket = request.getfixturevalue(f"{where}_bucket")
    url = upload(tokenizer_path, storage.join(bucket, "tok", "tokenizer.model"))
    local = Tokenizer(tokenizer_path)
    texts = ["def f(x):\n    return x * 2", "caf\u00e9 \u2603 \U0001f600", "<s>[INST] literal [/INST]"]
    for remote in (Tokenizer(url), Tokenizer(storage.join(bucket, "tok")), Tokenizer.find(storage.join(bucket, "tok"))):
        assert remote.path == url and remote.kind == "sentencepiece"
        assert (remote.vocab_size, remote.bos_id, remote.eos_id) == (local.vocab_size, local.bos_id, local.eos_id)
        for t in texts:
            assert remote.encode(t, eos=True) == local.encode(t, eos=True)
            assert remote.decode(local.encode(t)) == local.decode(local.encode(t))
    # the chat format goes through mistral-common, which reads a local file: a cached copy of the bucket's
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    assert chat.render(msgs, Tokenizer(url)).ids == chat.render(msgs, local).ids
    assert os.listdir(tmp_path / "cache" / "tokenizers")  # the copy, named by the content's hash
    # save: bucket -> local and local -> bucket keep the bytes
    with open(tokenizer_path, "rb") as f:
        want = f.read()
    out = tmp_path / "saved"
    out.mkdir()
    with open(Tokenizer(url).save(str(out)), "rb") as f:
        assert f.read() == want
    assert storage.read_bytes(local.save(storage.join(bucket, "copy"))) == want
    assert Tokenizer.find(storage.join(bucket, "nothing-here")) is None


@pytest.mark.heavy  # loads a 15 MB tekken file twice
def test_tekken_tokenizer_from_a_bucket_gives_the_local_ids(gcs_bucket, tmp_path, monkeypatch):
    from mistral_jax.data.tokenizer import named_tokenizer_path

    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    local = Tokenizer("mistral:tekken")
    url = upload(named_tokenizer_path("mistral:tekken"), storage.join(gcs_bucket, "nemo", "tekken.json"))
    for remote in (Tokenizer(url), Tokenizer(storage.join(gcs_bucket, "nemo"))):
        assert remote.kind == "tekken" and remote.instruct_version == local.instruct_version
        for t in ("Hello, world!", "caf\u00e9 \u2603"):
            assert remote.encode(t) == local.encode(t)


def test_tokenizer_errors_on_buckets(gcs_bucket):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(storage.join(gcs_bucket, "missing", "tokenizer.model"))
    with pytest.raises(storage.StorageError) as e:
        Tokenizer(f"gs://no-such-bucket-{os.getpid()}/tokenizer.model")
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)
    storage.write_bytes(storage.join(gcs_bucket, "junk.model"), b"not a model")
    with pytest.raises(ValueError, match="is not a valid sentencepiece model"):
        Tokenizer(storage.join(gcs_bucket, "junk.model"))


# ----------------------------------------------------------------------------------- mistral-jax-train-tokenizer
def test_train_tokenizer_reads_and_writes_buckets(gcs_bucket, tmp_path, capsys):
    from mistral_jax.cli import train_tokenizer as tool

    with open(TRAIN, encoding="utf-8") as f:
        lines = [ln for rec in f for ln in json.loads(rec)["text"].split("\n") if ln.strip()][:400]
    local_in = tmp_path / "in.txt"
    local_in.write_text("\n".join(lines) + "\n", encoding="utf-8")
    url_in = upload(str(local_in), storage.join(gcs_bucket, "corpus", "in.txt"))
    url_out = storage.join(gcs_bucket, "tok", "tokenizer.model")
    assert tool.main(["--input", str(local_in), "--output", str(tmp_path / "t.model"), "--vocab_size", "400"])
    assert tool.main(["--input", url_in, "--output", url_out, "--vocab_size", "400"]) == url_out
    assert storage.read_bytes(url_out) == (tmp_path / "t.model").read_bytes()  # trained on the same text
    before = storage.read_bytes(url_out)
    code, err = _cli(tool, ["--input", url_in, "--output", url_out], capsys)
    assert code == 2 and f"--output='{url_out}' already exists" in _one_line(err) and "--overwrite" in err
    assert storage.read_bytes(url_out) == before  # left as it was
    code, err = _cli(tool, ["--input", storage.join(gcs_bucket, "corpus", "nope.txt"), "--output", "x.model"],
                     capsys)
    assert code == 2 and "is not a file" in _one_line(err)
    missing = f"gs://no-such-bucket-{os.getpid()}/tok/tokenizer.model"
    code, err = _cli(tool, ["--input", url_in, "--output", missing], capsys)
    assert code == 2 and "does not exist. Fix: create it" in _one_line(err)
    assert not os.path.exists("gs:") and not os.path.exists("x.model")


# ---------------------------------------------------------------------------------- generate / serve / eval
def _bad_checkpoints(bucket: str) -> list[tuple[str, str]]:
    return [(f"gs://no-such-bucket-{os.getpid()}/ckpt", "does not exist. Fix: create it"),
            (storage.join(bucket, "no-such-dir"), "does not exist. Fix: check the path")]


@pytest.mark.parametrize("tool", ["generate", "serve"])
def test_inference_tools_check_bucket_checkpoints_before_loading(tool, gcs_bucket, capsys, monkeypatch):
    import importlib

    module = importlib.import_module(f"mistral_jax.cli.{tool}")
    extra = ["--prompt", "hi"] if tool == "generate" else ["--port", "0"]
    for url, expected in _bad_checkpoints(gcs_bucket):
        start = time.time()
        code, err = _cli(module, ["--checkpoint", url, *extra], capsys)
        assert code == 2 and f"--checkpoint='{url}'" in _one_line(err) and expected in err, err
        assert time.time() - start < 10
    code, err = _cli(module, ["--checkpoint", "./ckpt", "--tokenizer", storage.join(gcs_bucket, "t.model"), *extra],
                     capsys)
    assert code == 2 and "--checkpoint='./ckpt' does not exist" in _one_line(err)  # the checkpoint is checked first
    from tests.emulators import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # a stopped endpoint
    code, err = _cli(module, ["--checkpoint", storage.join(gcs_bucket, "ckpt"), *extra], capsys)
    assert code == 2 and "connection refused" in _one_line(err)


def test_serve_names_a_bucket_checkpoint_by_its_directory():
    from mistral_jax.cli.serve import checkpoint_name

    assert checkpoint_name("gs://bkt/runs/tiny/") == "tiny" == checkpoint_name("s3://bkt/runs/tiny")
    assert checkpoint_name("runs/tiny/") == "tiny"


@pytest.mark.oracle  # mistral_jax.evals imports lm-eval
def test_eval_checks_bucket_paths_before_loading(gcs_bucket, tmp_path):
    from absl import flags

    from mistral_jax.cli import UsageError
    from mistral_jax.evals import args

    def check(**kw):
        values = flags.FlagValues()
        for name in ("checkpoint", "tokenizer", "include_path", "output_path"):
            flags.DEFINE_string(name, None, "", flag_values=values)
        values(["eval.py"] + [f"--{k}={v}" for k, v in kw.items()])
        args.check_paths(values)

    for url, expected in _bad_checkpoints(gcs_bucket):
        with pytest.raises(UsageError, match=expected):
            check(checkpoint=url)
    with pytest.raises(UsageError, match=r"--output_path='gs://no-such-bucket-\d+/evals': the bucket .* does not"):
        check(checkpoint=str(tmp_path), output_path=f"gs://no-such-bucket-{os.getpid()}/evals")
    storage.write_bytes(storage.join(gcs_bucket, "evals", "file"), b"x")
    with pytest.raises(UsageError, match="--output_path=.* is a file"):
        check(checkpoint=str(tmp_path), output_path=storage.join(gcs_bucket, "evals", "file"))
    with pytest.raises(UsageError, match="--checkpoint=.* is not a checkpoint directory"):  # past the output check
        check(checkpoint=str(tmp_path), output_path=storage.join(gcs_bucket, "evals"))
    assert storage.filesystem("gs").find(gcs_bucket.split("://")[1]) == [
        gcs_bucket.split("://")[1] + "/evals/file"]  # the write probe left nothing behind


@pytest.mark.oracle  # mistral_jax.evals imports lm-eval
def test_staged_eval_outputs_land_in_the_bucket(gcs_bucket, tmp_path, monkeypatch):
    from mistral_jax.evals.run import staged_output

    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    url = storage.join(gcs_bucket, "evals")
    with staged_output(url) as out:
        assert not storage.is_remote(out) and out.startswith(str(tmp_path / "cache"))
        os.makedirs(os.path.join(out, "model"))
        for name in ("results_1.json", "samples_t_1.jsonl"):
            with open(os.path.join(out, "model", name), "w") as f:
                f.write(name)
    for name in ("results_1.json", "samples_t_1.jsonl"):
        assert storage.read_bytes(storage.join(url, "model", name)) == name.encode()
    assert os.listdir(tmp_path / "cache" / "eval_outputs") == []  # the stand-in is gone
    with staged_output(storage.join(url, "res.json")) as out:  # lm-eval: <stem>_<date>.json beside it
        assert out.endswith("res.json")
        with open(os.path.join(os.path.dirname(out), "res_2.json"), "w") as f:
            f.write("r")
    assert storage.read_bytes(storage.join(url, "res_2.json")) == b"r"
    with pytest.raises(RuntimeError, match="eval failed"), staged_output(storage.join(gcs_bucket, "failed")) as out:
        with open(os.path.join(out, "partial.json"), "w") as f:
            f.write("x")
        raise RuntimeError("eval failed")
    assert not storage.path(storage.join(gcs_bucket, "failed", "partial.json")).exists()  # nothing uploaded
    assert os.listdir(tmp_path / "cache" / "eval_outputs") == []
    assert staged_output(None).__enter__() is None




@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tokenizer_path):
    """A tiny random model exported as a mistral_jax export dir with its tokenizer, and a task over local json."""
    from flax import nnx

    import mistral_jax as mj

    root = tmp_path_factory.mktemp("bucket_tools")
    model = mj.Transformer(mj.ModelConfig.tiny(initializer_range=0.2), rngs=nnx.Rngs(0))
    mj.save_jax(model, str(root / "export"), tokenizer=tokenizer_path)
    rows = [{"question": f"what is {i} plus {i}", "choices": ["two", "four", "six"], "label": i % 3} for i in range(4)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "bucket_mc.yaml").write_text(mc_task_yaml("bucket_mc", root / "mc.jsonl"))
    return dict(root=root, model=model, export=str(root / "export"), tasks=str(root / "tasks"))


@pytest.mark.oracle
@pytest.mark.heavy
def test_eval_writes_results_and_samples_to_a_bucket(tiny_export, tokenizer_path, gcs_bucket, tmp_path,
                                                      monkeypatch):
    from lm_eval.tasks import TaskManager

    from mistral_jax.evals.lm import MistralJaxLM
    from mistral_jax.evals.run import evaluate

    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    lm = MistralJaxLM(model=tiny_export["model"], tokenizer=tokenizer_path, batch_size=8)
    tm = TaskManager(include_path=tiny_export["tasks"], include_defaults=False)
    url = storage.join(gcs_bucket, "evals")
    res = evaluate(lm=lm, tasks=["bucket_mc"], task_manager=tm, log_samples=True, output_path=url, verbose=False)
    keys = storage.filesystem("gs").find(url.split("://")[1])
    (results,) = [k for k in keys if os.path.basename(k).startswith("results_") and k.endswith(".json")]
    (samples,) = [k for k in keys if os.path.basename(k).startswith("samples_bucket_mc_")]
    saved = json.loads(storage.read_bytes(f"gs://{results}"))
    assert saved["results"]["bucket_mc"]["acc,none"] == res["results"]["bucket_mc"]["acc,none"]
    assert len(storage.read_bytes(f"gs://{samples}").decode().splitlines()) == 4
    assert os.path.dirname(results) == os.path.dirname(samples) == url.split("://")[1] + "/in-memory"  # lm-eval's
    assert os.listdir(tmp_path / "cache" / "eval_outputs") == []


@pytest.mark.slow
def test_generate_from_a_bucket_checkpoint_equals_local(tiny_export, gcs_bucket, capsys):
    import mistral_jax.cli.generate as tool

    url = upload(tiny_export["export"], storage.join(gcs_bucket, "export"))
    argv = ["--prompt", "the cat sat on", "--max_new_tokens", "12"]
    local = tool.main(["--checkpoint", tiny_export["export"], *argv])
    assert tool.main(["--checkpoint", url, *argv]) == local
    assert tool.main(["--checkpoint", url, "--tokenizer", storage.join(url, "tokenizer.model"), *argv]) == local


@pytest.mark.slow
def test_serve_from_a_bucket_checkpoint(tiny_export, gcs_bucket):
    import requests

    import mistral_jax as mj
    from mistral_jax.serve.app import encode_prompt

    url = upload(tiny_export["export"], storage.join(gcs_bucket, "served"))
    proc = subprocess.Popen([sys.executable, "-m", "mistral_jax.serve", "--checkpoint", url, "--port", "0",
                             "--max_batch", "2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line, lines = "", []
        deadline = time.monotonic() + 180
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
            lines.append(line)
        assert "serving 'served' on http://127.0.0.1:" in line, "".join(lines)
        r = requests.post(line.split(" on ")[1].split()[0] + "/v1/completions",
                          json={"prompt": "the", "max_tokens": 6, "temperature": 0}, timeout=60).json()
        tok = Tokenizer(os.path.join(tiny_export["export"], "tokenizer.model"))
        ids = mj.generate(tiny_export["model"], encode_prompt(tok, "the"), max_new_tokens=6, eos_id=tok.eos_id)
        from mistral_jax.inference.detokenize import decode_text

        assert r["choices"][0]["text"] == decode_text(tok, [t for t in ids if t != tok.eos_id])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.oracle
@pytest.mark.slow
def test_eval_py_on_a_bucket_checkpoint_writes_to_a_bucket(tiny_export, gcs_bucket, monkeypatch, capsys):
    import importlib

    import lm_eval.tasks

    url = upload(tiny_export["export"], storage.join(gcs_bucket, "export"))
    tm = lm_eval.tasks.TaskManager(include_path=tiny_export["tasks"], include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None, **kw: tm)  # skip re-indexing
    sys.path.insert(0, ROOT)
    cli = importlib.import_module("eval")
    out = storage.join(gcs_bucket, "evals")
    argv = ["eval.py", f"--checkpoint={url}", "--tasks=bucket_mc", "--batch_size=8", f"--output_path={out}",
            "--log_samples"]
    cli.FLAGS(argv)
    try:
        assert cli.main(argv[:1]) == 0
    finally:
        cli.FLAGS.unparse_flags()
    keys = storage.filesystem("gs").find(out.split("://")[1])
    assert any(os.path.basename(k).startswith("results_") for k in keys), keys
    assert any(os.path.basename(k).startswith("samples_bucket_mc_") for k in keys), keys


@pytest.mark.slow
def test_training_on_bucket_data_and_tokenizer_equals_local(tiny_trained_run, tokenizer_path, gcs_bucket, tmp_path):
    """The shared tiny run (bundled corpus, local tokenizer), again with both in a bucket: the same losses."""
    from configs import tiny
    from mistral_jax.training import trainer
    from mistral_jax.training.metrics import read_metrics

    data = upload(TRAIN, storage.join(gcs_bucket, "corpus", "train.jsonl"))
    tok = upload(tokenizer_path, storage.join(gcs_bucket, "tok", "tokenizer.model"))
    c = tiny.get_config()
    c.update_from_flattened_dict({"num_steps": 30, "log_every": 10, "eval_every": 0, "checkpoint.every_steps": 30,
                                  "data.tokenizer": tok, "data.train": data, "data.validation": "",
                                  "progress_bar": False, "checkpoint.async_save": False})
    trainer.train(c, str(tmp_path / "run"))
    ours = [r["loss"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    ref = [r["loss"] for r in read_metrics(tiny_trained_run) if "loss" in r]
    assert len(ours) == len(ref) == 3 and ours == ref


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny_sft", "tiny_dpo"])
def test_fine_tuning_from_a_bucket_init_from_equals_local(recipe, tiny_trained_run, gcs_bucket, tmp_path):
    """SFT and DPO with ``init_from=gs://...`` (the shared tiny run's workdir copied to the bucket), into a bucket
    workdir: the same losses as from the local copy into a local workdir."""
    import importlib

    from mistral_jax.training import trainer
    from mistral_jax.training.metrics import read_metrics

    remote = upload(tiny_trained_run, storage.join(gcs_bucket, "pretrained"))
    losses = {}
    for where, init_from, workdir in (("local", tiny_trained_run, str(tmp_path / "run")),
                                      ("bucket", remote, storage.join(gcs_bucket, "tuned"))):
        c = importlib.import_module(f"configs.{recipe}").get_config()
        c.update_from_flattened_dict({"init_from": init_from, "num_steps": 3, "optimizer.warmup_steps": 1,
                                      "log_every": 1, "eval_every": 0, "data.validation": "", "progress_bar": False,
                                      "checkpoint.every_steps": 3, "checkpoint.async_save": False})
        trainer.train(c, workdir)
        losses[where] = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
    assert len(losses["local"]) == 3 and losses["bucket"] == losses["local"]
    assert storage.path(storage.join(gcs_bucket, "tuned", "checkpoints", "3", "commit_success.txt")).exists()
