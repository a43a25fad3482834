"""GGUF export (``python -m mistral_jax.convert --to gguf``, ``convert/gguf.py``) against llama.cpp itself.

The oracle is llama.cpp through ``llama-cpp-python``: the export is loaded by ``llama_cpp.Llama`` and its logits (K / V
cache in float32) must equal the project's to 1e-3 on 5 prompts, its greedy continuations token for token, for
the tiny trained run (window 16, shorter than the prompts: the ``granite_swa`` architecture), a windowless Mistral
and a Mixtral (the ``llama`` architecture); its tokenizer (v1 / v3 sentencepiece, tekken) gives the project's ids
and its chat template renders the project's chat prompt; q8_0 keeps >= 90 % of the greedy tokens. A window that
the ``llama`` architecture cannot hold is shown to be ignored by llama.cpp (the reason for ``granite_swa``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import cli, storage
from mistral_jax.cli.convert import GGUF_DTYPES
from mistral_jax.cli.convert import main as convert_main
from mistral_jax.convert import gguf as gguf_export
from mistral_jax.convert import hf as hf_export
from mistral_jax.convert import paths
from mistral_jax.convert.sources import ParamsSource
from mistral_jax.data.chat import render_prompt
from mistral_jax.model.transformer import params_dict
from tests.helpers import oracle_module
from tests.llama_worker import LlamaProcess

pytestmark = pytest.mark.oracle  # llama.cpp (llama-cpp-python) reads every export back
gguf = oracle_module("gguf")

ATOL = 1e-3
NEW_TOKENS = 16
# Single spaces: the trained tokenizer collapses whitespace runs (sentencepiece's remove_extra_whitespaces), which
# llama.cpp's SPM tokenizer never does (Mistral's own tokenizers keep them: see TEXTS below).
PROMPTS = (
    "The sqlite3 module provides a SQL interface compliant with the DB-API 2.0 specification described by PEP 249.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Return a new sorted list from the items in iterable, with a key function and a reverse flag.",
    "import os",
    "Exceptions raised in a with statement propagate unless the context manager suppresses them.",
)


@pytest.fixture(scope="module", autouse=True)
def _worker():
    """llama.cpp in its own process for the module (tests/llama_worker.py): never loaded next to XLA's compiler."""
    global WORKER
    WORKER = LlamaProcess()
    yield WORKER
    WORKER.close()


WORKER: LlamaProcess | None = None


def _llama(path: str, n_ctx: int = 256, vocab_only: bool = False):
    return WORKER.open(path, n_ctx, vocab_only)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    return np.array(llm.logits(ids), np.float32)


def _llama_greedy(llm, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    return llm.greedy(prompt, n)


def _logits(model, ids: list[int]) -> np.ndarray:
    return np.asarray(model(np.asarray([ids], np.int32)))[0]


def _greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    return [int(t) for t in mj.generate(model, prompt, max_new_tokens=n, temperature=0.0, eos_id=None)]


def _random_prompts(vocab: int, n: int = 5, seed: int = 0) -> list[list[int]]:
    """5 prompts of 32 ids (a BOS and 31 random ones): longer than the windows below; one length, one compile."""
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, vocab, 31).tolist()] for _ in range(n)]


def _export(model, out: str, tokenizer, **kw) -> str:
    gguf_export.export(out, ParamsSource(model.cfg, params_dict(model)), tokenizer=tokenizer, **kw)
    return os.path.join(out, gguf_export.FILENAME)


def _metadata(path: str) -> dict:
    r = gguf.GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            out[k] = bytes(f.parts[f.data[0]]).decode()
        elif f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            out[k] = f.parts[f.data[0]][0].item()
    return out


def _check_logits_and_greedy(model, path: str, prompts: list[list[int]], n_ctx: int = 256) -> float:
    """Logits of every prompt to ATOL and 16 greedy tokens equal; returns the largest logit difference."""
    llm = _llama(path, n_ctx)
    worst = 0.0
    for ids in prompts:
        ours, theirs = _logits(model, ids), _llama_logits(llm, ids)
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
        np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
        assert _llama_greedy(llm, ids) == _greedy(model, ids), ids
    return worst


def _agreement(model, path: str, prompts: list[list[int]]) -> tuple[float, float]:
    """How often llama.cpp picks the project's greedy tokens: ``(per step, free running)``. Per step: at each of the
    project's 16 greedy steps, llama.cpp's argmax after the same prefix (teacher forcing: one flip of a near tie
    does not derail the rest). Free running: llama.cpp's own greedy continuation, position by position."""
    llm = _llama(path)
    step = free = total = 0
    for ids in prompts:
        ours = _greedy(model, ids)
        step += int((_llama_logits(llm, ids + ours[:-1])[len(ids) - 1:].argmax(-1) == np.array(ours)).sum())
        free += sum(a == b for a, b in zip(ours, _llama_greedy(llm, ids), strict=True))
        total += len(ours)
    return step / total, free / total


# ------------------------------------------------------------------------------------------------ the trained run
@pytest.fixture(scope="module")
def trained(tiny_trained_run, tmp_path_factory):
    """The tiny trained run (window 16) exported by the command line, float32 and q8_0, and loaded by the project."""
    root = tmp_path_factory.mktemp("gguf_trained")
    out = {}
    for dtype in ("float32", "q8_0"):
        code = convert_main(["--from", "jax", "--to", "gguf", "--input", tiny_trained_run, "--output",
                             str(root / dtype), "--dtype", dtype])
        assert code == 0
        out[dtype] = str(root / dtype / gguf_export.FILENAME)
    model = mj.load_pretrained(tiny_trained_run)
    tok = mj.Tokenizer(tiny_trained_run)
    return model, tok, out


@pytest.mark.heavy  # the shared tiny trained run (session fixture), exported twice
def test_trained_run_logits_and_greedy_match_llama_cpp(trained):
    model, tok, files = trained
    meta = _metadata(files["float32"])
    assert meta["general.architecture"] == "granite_swa"  # window 16 < the 512-token context
    assert meta["granite_swa.attention.sliding_window"] == model.cfg.sliding_window == 16
    assert meta["granite_swa.rope.freq_base"] == model.cfg.rope_theta
    assert meta["granite_swa.context_length"] == model.cfg.max_seq_len
    assert meta["general.file_type"] == 0  # ALL_F32
    llm = _llama(files["float32"])
    prompts = []
    for text in PROMPTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode()) == ids, text  # llama.cpp's SPM tokenizer gives the project's ids
        prompts.append(ids)
    assert max(map(len, prompts)) > 2 * model.cfg.sliding_window  # the window is exercised
    worst = _check_logits_and_greedy(model, files["float32"], prompts)
    print(f"trained run: max |logits difference| {worst:.2e}")


@pytest.mark.heavy
def test_trained_run_q8_0_keeps_the_greedy_tokens(trained):
    model, tok, files = trained
    assert _metadata(files["q8_0"])["general.file_type"] == 7  # MOSTLY_Q8_0
    r = gguf.GGUFReader(files["q8_0"])
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    step, free = _agreement(model, files["q8_0"], [tok.encode(t) for t in PROMPTS])
    print(f"trained run q8_0: greedy agreement {step:.0%} per step, {free:.0%} free running")
    assert step >= 0.9


# ------------------------------------------------------------------------------------------------ random models
CONFIGS = {
    # no window: llama.cpp's llama architecture, as its own converter writes Mistral v0.2+
    "mistral": mj.ModelConfig.tiny(vocab_size=512, dim=64, hidden_dim=128, head_dim=16, sliding_window=None,
                                   rope_theta=1e6, initializer_range=0.1),
    # experts stacked ffn_{gate,up,down}_exps [E, out, in], router ffn_gate_inp
    "mixtral": mj.ModelConfig.tiny_mixtral(vocab_size=512, dim=64, hidden_dim=96, head_dim=16,
                                           initializer_range=0.1),
    # window 8, shorter than every prompt: granite_swa
    "mistral_window": mj.ModelConfig.tiny(vocab_size=512, dim=64, hidden_dim=128, head_dim=16, sliding_window=8,
                                          initializer_range=0.1),
    # granite_swa with experts
    "mixtral_window": mj.ModelConfig.tiny_mixtral(vocab_size=512, dim=64, hidden_dim=96, head_dim=16,
                                                  sliding_window=8, initializer_range=0.1),
    # tied embeddings (no output tensor: llama.cpp reuses token_embd); heads x head_dim 128 != dim 64, as NeMo's
    "mistral_tied": mj.ModelConfig.tiny(vocab_size=512, dim=64, hidden_dim=128, head_dim=32, sliding_window=None,
                                        tie_embeddings=True, initializer_range=0.1),
}


@pytest.fixture(scope="module")
def random_models(tokenizer_path):
    """The random models above (vocabulary 512: the shared test tokenizer's, which their GGUF files carry)."""
    return {name: mj.Transformer(cfg, rngs=nnx.Rngs(7)) for name, cfg in CONFIGS.items()}


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_model_logits_and_greedy_match_llama_cpp(random_models, tokenizer_path, tmp_path, name):
    model = random_models[name]
    path = _export(model, str(tmp_path / "gguf"), tokenizer_path, dtype="float32")
    meta = _metadata(path)
    arch = "granite_swa" if name.endswith("_window") else "llama"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.key_length"] == model.cfg.head_dim
    if model.cfg.is_moe:
        assert meta[f"{arch}.expert_count"] == 4 and meta[f"{arch}.expert_used_count"] == 2
        shapes = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(path).tensors}
        assert shapes["blk.1.ffn_gate_exps.weight"] == [64, 96, 4]  # GGUF order: [in, out, E]
        assert shapes["blk.1.ffn_down_exps.weight"] == [96, 64, 4]
        assert shapes["blk.1.ffn_gate_inp.weight"] == [64, 4]
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) != model.cfg.tie_embeddings
    worst = _check_logits_and_greedy(model, path, _random_prompts(model.cfg.vocab_size))
    print(f"{name}: max |logits difference| {worst:.2e}")


@pytest.mark.heavy
def test_mixtral_q8_0_keeps_the_greedy_tokens(random_models, tokenizer_path, tmp_path):
    model = random_models["mixtral"]
    path = _export(model, str(tmp_path / "gguf"), tokenizer_path, dtype="q8_0")
    step, free = _agreement(model, path, _random_prompts(model.cfg.vocab_size))
    print(f"mixtral q8_0: greedy agreement {step:.0%} per step, {free:.0%} free running")
    assert step >= 0.9  # a random model's near ties: one flip changes the rest of a free-running continuation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.sendfile to a file is Linux's")
@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_export_from_hf_files_copies_unchanged_tensors_and_equals_the_array_path(random_models, tokenizer_path,
                                                                                tmp_path, monkeypatch, dtype):
    """From HF files, a tensor that GGUF stores as the file does (the Mistral layout's transform, the stored dtype:
    every float32 tensor but the RoPE-permuted ``wq`` / ``wk``; each layer's experts stacked from per-expert tensors)
    is copied file to file (``os.sendfile``). The file equals, byte for byte, the export of the same parameters held
    in memory, where every tensor goes through numpy (q8_0 included: norms and the router stay float32)."""
    model = random_models["mixtral"]
    mj.save_hf(model, tmp_path / "hf")
    sent, real = [], os.sendfile

    def spy(out_fd, in_fd, offset, count):
        sent.append(real(out_fd, in_fd, offset, count))
        return sent[-1]

    monkeypatch.setattr(os, "sendfile", spy)
    gguf_export.export(str(tmp_path / "files"), hf_export.open_source(str(tmp_path / "hf")),
                       tokenizer=tokenizer_path, dtype=dtype)
    monkeypatch.undo()
    p = params_dict(model)
    layers, attn = p["layers"], p["layers"]["attention"]
    if dtype == "float32":
        copied = sum(x.size for x in jax.tree.leaves(p)) - attn["wq"].size - attn["wk"].size
    else:  # what stays float32 in a q8_0 file
        copied = (layers["attention_norm"]["weight"].size + layers["ffn_norm"]["weight"].size + p["norm"]["weight"].size
                  + layers["feed_forward"]["gate"].size)
    assert sum(sent) == 4 * copied
    from_arrays = _export(model, str(tmp_path / "arrays"), tokenizer_path, dtype=dtype)
    with open(os.path.join(tmp_path / "files", gguf_export.FILENAME), "rb") as a, open(from_arrays, "rb") as b:
        assert a.read() == b.read()


def test_q8_0_quantizer_is_ggufs_bit_for_bit():
    """``quantize_q8_0`` (XLA for the elementwise work) equals gguf's own ``quants.quantize`` (llama.cpp's reference
    rounding) on every block: scales from 1e-30 to 1e4, halves that round away from zero, zero blocks, the tensor
    shapes of an export (2-D, stacked experts) and a tensor smaller and larger than one chunk."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((300, 1024)).astype(np.float32) * np.float32(10.0 ** e) for e in (-30, -3, 0, 4)]
    halves = (rng.integers(-254, 255, (64, 1024)) / 2).astype(np.float32)
    halves[:, ::32] = 127  # d = 1: every value is its own rounding input, half of them exact .5
    arrays += [halves, np.zeros((3, 64), np.float32), rng.standard_normal((4, 6, 96)).astype(np.float32),
               rng.standard_normal((1, 32)).astype(np.float32),
               rng.standard_normal((gguf_export._Q8_BLOCKS // 8 + 5, 256)).astype(np.float32)]  # > one chunk
    for x in arrays:
        want = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
        got = gguf_export.quantize_q8_0(x)
        assert got.dtype == want.dtype and got.shape == want.shape, x.shape
        assert np.array_equal(got, want), x.shape


@pytest.mark.heavy
def test_llama_architecture_ignores_the_sliding_window(random_models, tokenizer_path, tmp_path):
    """Why ``granite_swa``: the ``llama`` architecture reads no window (``llama.attention.sliding_window`` is
    written but llama.cpp does not use it), so it equals the model only within the first W positions."""
    model = random_models["mistral_window"]
    w = model.cfg.sliding_window
    path = _export(model, str(tmp_path / "gguf"), tokenizer_path, dtype="float32", arch="llama")
    assert _metadata(path)["llama.attention.sliding_window"] == w
    llm = _llama(path)
    inside = beyond = 0.0
    for ids in _random_prompts(model.cfg.vocab_size):
        diff = np.abs(_logits(model, ids) - _llama_logits(llm, ids)).max(axis=-1)
        inside, beyond = max(inside, float(diff[:w].max())), max(beyond, float(diff[w:].max()))
    print(f"llama arch, window {w}: max |logits difference| {inside:.2e} within W, {beyond:.2e} beyond")
    assert inside < ATOL < 10 * ATOL < beyond


@pytest.mark.heavy
def test_bfloat16_and_float16_exports_load_and_mostly_agree(random_models, tokenizer_path, tmp_path):
    model = random_models["mistral"]
    prompts = _random_prompts(model.cfg.vocab_size)
    for dtype, code in (("bfloat16", 32), ("float16", 1)):
        path = _export(model, str(tmp_path / dtype), tokenizer_path, dtype=dtype)
        assert _metadata(path)["general.file_type"] == code
        kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert kinds["token_embd.weight"] == {"bfloat16": "BF16", "float16": "F16"}[dtype]
        assert kinds["output_norm.weight"] == "F32"
        llm = _llama(path)
        for ids in prompts[:2]:
            np.testing.assert_allclose(_llama_logits(llm, ids), _logits(model, ids), atol=0.05, rtol=0)


# ------------------------------------------------------------------------------------------------ tokenizers
TEXTS = (
    "Hello, world! How are you today?",
    "  leading spaces and trailing  ",
    "Numbers 1234567 and unicode: café, 東京, 🙂.",
    "def f(x):\n\treturn x ** 2  # comment",
    "[INST] not a control token [/INST]",
)


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["mistral:v1", "mistral:v3", "mistral:tekken"])
def test_mistral_tokenizers_tokenize_as_the_project(tmp_path, name):
    tok = mj.Tokenizer(name)
    cfg = mj.ModelConfig.tiny(vocab_size=tok.vocab_size, dim=32, hidden_dim=32, n_heads=2, n_kv_heads=1,
                              head_dim=16, n_layers=1, sliding_window=None)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    path = _export(model, str(tmp_path / "gguf"), tok, dtype="float16")
    meta = _metadata(path)
    assert meta["tokenizer.ggml.model"] == ("gpt2" if tok.kind == "tekken" else "llama")
    if tok.kind == "tekken":
        assert meta["tokenizer.ggml.pre"] == "tekken"
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id and meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    llm = _llama(path, vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode()) == tok.encode(text), (name, text)
    # the chat template: the HF export's, rendering the prompt mistral-common encodes
    from mistral_jax.convert.hf import chat_template

    template = meta["tokenizer.chat_template"]
    assert template == chat_template(tok.instruct_version)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"}]
    prompt = WORKER.chat(template, bos=tok.id_to_piece(tok.bos_id), eos=tok.id_to_piece(tok.eos_id),
                         messages=messages)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == render_prompt(messages, tok), (name, prompt)


# ------------------------------------------------------------------------------------------------ buckets, misuse
def test_gguf_export_from_and_to_a_bucket(random_models, tokenizer_path, gcs_bucket, tmp_path, capsys):
    """An HF checkpoint on a bucket converted by the command line into a bucket: the same bytes as the local
    export, the export marker listing model.gguf, and llama.cpp loads it."""
    model = random_models["mixtral"]
    hf_url = mj.save_hf(model, storage.join(gcs_bucket, "hf"), tokenizer=tokenizer_path)
    out = storage.join(gcs_bucket, "gguf")
    assert cli.run(lambda: convert_main(["--from", "hf", "--to", "gguf", "--input", hf_url, "--output", out]),
                   "convert") == 0
    marker = json.loads(storage.read_bytes(storage.join(out, paths.MARKER)))
    assert marker["kind"] == "gguf" and set(marker["files"]) == {gguf_export.FILENAME}
    local = _export(model, str(tmp_path / "local"), tokenizer_path)
    assert storage.read_bytes(storage.join(out, gguf_export.FILENAME)) == open(local, "rb").read()
    shutil.copy(local, tmp_path / "copy.gguf")
    assert _llama(str(tmp_path / "copy.gguf")).n_vocab() == model.cfg.vocab_size


def test_gguf_misuse_is_one_line_and_exit_2(random_models, tokenizer_path, tmp_path, capsys):
    model = random_models["mistral"]
    src = mj.save_mistral(model, tmp_path / "src", tokenizer=tokenizer_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        (["--to", "gguf", "--dtype", "int4"], "--dtype='int4'"),
        (["--to", "hf", "--dtype", "q8_0"], "--dtype='q8_0' is a GGUF type"),
        (["--to", "hf", "--gguf_arch", "llama"], "--gguf_arch='llama' only applies to --to gguf"),
        (["--to", "gguf", "--output", str(taken)], "is not a previous gguf export"),
    ]
    for extra, expected in cases:
        argv = ["--from", "mistral", "--input", str(src), "--output", str(tmp_path / "out"), *extra]
        assert convert_main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert (taken / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    assert GGUF_DTYPES == gguf_export.DTYPES


def test_gguf_overwrite_replaces_only_a_gguf_export(random_models, tokenizer_path, tmp_path, capsys):
    model = random_models["mistral"]
    src = mj.save_mistral(model, tmp_path / "src", tokenizer=tokenizer_path)
    argv = ["--from", "mistral", "--to", "gguf", "--input", str(src), "--output", str(tmp_path / "out")]
    assert convert_main(argv) == 0
    assert os.listdir(tmp_path / "out") == [gguf_export.FILENAME]
    assert convert_main(argv) == 2  # exists
    assert "a previous gguf export" in capsys.readouterr().err
    assert convert_main([*argv, "--overwrite", "--dtype", "q8_0"]) == 0
    assert convert_main(["--from", "mistral", "--to", "hf", "--input", str(src), "--output", str(tmp_path / "out"),
                         "--overwrite"]) == 2  # a gguf export is not an hf one


def test_a_checkpoint_without_tokenizer_is_refused_before_writing(random_models, tmp_path, capsys):
    src = mj.save_mistral(random_models["mistral"], tmp_path / "src")  # no tokenizer next to it
    argv = ["--from", "mistral", "--to", "gguf", "--input", str(src), "--output", str(tmp_path / "out")]
    assert convert_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the model's tokenizer" in err[0], err
    assert not (tmp_path / "out").exists()
