"""train.py on prepared data: the prepared dataset's own tokenizer, resume to the uninterrupted run's losses,
mixtures from the config (their position in the checkpoint), one-line refusals before any device work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mistral_jax.data import prepared
from tests.helpers import run_losses, write_prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 32


def _corpus(split: str = "train") -> list[str]:
    path = os.path.join(ROOT, "mistral_jax", "data", "corpus", f"pydoc_{split}.jsonl")
    return [json.loads(line)["text"] for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tokenizer_path):
    """Two prepared datasets from the bundled corpus (halves of it) and a held-out one."""
    base = tmp_path_factory.mktemp("prepared_corpus")
    docs = _corpus()
    half = len(docs) // 2
    write_prepared(str(base / "web"), [docs[:half // 2], docs[half // 2:half]], tokenizer_path, SEQ)
    write_prepared(str(base / "code"), [docs[half:]], tokenizer_path, SEQ)
    write_prepared(str(base / "val"), [_corpus("validation")], tokenizer_path, SEQ)
    return base


def _cfg(**overrides):
    from mistral_jax.training import trainer

    cfg = trainer.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.progress_bar = False
    cfg.update_from_flattened_dict({"batch_size": 8, "log_every": 1, "data.seq_len": SEQ, "eval_every": 0,
                                    "eval_steps": 2, "checkpoint.async_save": False, "optimizer.warmup_steps": 1,
                                    **overrides})
    return cfg


def _truncate(ref: str, dest: str, keep: int) -> None:
    """``dest``: a copy of run ``ref`` as it stood at step ``keep`` (later checkpoints and metrics dropped)."""
    shutil.copytree(ref, dest)
    for step in os.listdir(os.path.join(dest, "checkpoints")):
        if step.isdigit() and int(step) > keep:
            shutil.rmtree(os.path.join(dest, "checkpoints", step))
    with open(os.path.join(dest, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line).get("step", 0) <= keep]
    with open(os.path.join(dest, "metrics.jsonl"), "w") as f:
        f.writelines(kept)


@pytest.mark.slow
def test_training_on_a_mixture_resumes_to_the_uninterrupted_losses(corpora, tmp_path):
    """A mixture of two prepared datasets (and prepared held-out data): no tokenizer in the config (the prepared
    data's is used), the data position (global batch index and weights) in each checkpoint, a resume from step 3
    continuing with the uninterrupted run's losses; a resume with other weights is refused."""
    from mistral_jax.training import trainer

    mix = {"data.train": "", "data.mixture": "web:0.6,code:0.4",
           "data.datasets": f"web={corpora / 'web'},code={corpora / 'code'}", "data.validation": str(corpora / "val"),
           "data.tokenizer": "", "num_steps": 6, "checkpoint.every_steps": 3}
    ref = str(tmp_path / "ref")
    assert trainer.train(_cfg(**mix), ref)["step"] == 6
    tok_bytes = open(os.path.join(ref, "tokenizer.model"), "rb").read()
    assert tok_bytes == open(os.path.join(corpora / "web", "tokenizer.model"), "rb").read()
    state = json.load(open(os.path.join(ref, "checkpoints", "3", "data_state", "metadata")))
    assert state["kind"] == "prepared" and state["grain"]["next_index"] == 3
    assert state["mixture"] == pytest.approx({"web": 0.6, "code": 0.4})

    resumed = str(tmp_path / "resumed")
    _truncate(ref, resumed, 3)
    assert trainer.train(_cfg(**mix), resumed)["step"] == 6
    want, got = run_losses(ref), run_losses(resumed)
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rtol=1e-6)
    assert all(np.isfinite(v) for v in want.values())

    changed = str(tmp_path / "changed")
    _truncate(ref, changed, 3)
    from mistral_jax.data.loader import MixtureChanged

    with pytest.raises(MixtureChanged, match="allow_mixture_change"):
        trainer.train(_cfg(**{**mix, "data.mixture": "web:0.5,code:0.5"}), changed)


@pytest.mark.heavy
def test_prepared_batches_equal_the_packer_over_the_same_text(corpora, tokenizer_path):
    """The recipe's batches from prepared data, unshuffled: rows of ``pack_documents`` over the same documents,
    id for id (tokens, targets, positions, segment ids, weights), split between two processes' rows."""
    import jax

    from mistral_jax import sharding
    from mistral_jax.data.pipeline import pack_documents
    from mistral_jax.data.tokenizer import Tokenizer
    from mistral_jax.training import recipe as recipe_lib

    cfg = _cfg(**{"data.train": str(corpora / "web"), "data.shuffle": False, "data.tokenizer": tokenizer_path})
    rec = recipe_lib.choose(cfg)
    src = rec.open_data("train")
    tok = Tokenizer(tokenizer_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    bsharding = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
    it = rec.batches(src, tok, 8, train=True, bsharding=bsharding)
    docs = _corpus()
    half = len(docs) // 2  # the fixture's "web": two shards, documents [0, half // 2) and [half // 2, half)
    want = [r for part in (docs[:half // 2], docs[half // 2:half]) for r in
            pack_documents((tok.encode(t, bos=True, eos=True) for t in part), SEQ)]
    assert len(want) == len(src.components[0][1])
    for b in range(len(want) // 8):
        batch = next(it)
        for k in want[0]:
            assert np.array_equal(batch[k], np.stack([w[k] for w in want[b * 8:(b + 1) * 8]])), (b, k)


def _train_cli(*flags, tmp_path):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/tiny.py",
                           f"--workdir={tmp_path / 'w'}", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.heavy
def test_bad_prepared_data_is_one_line_and_exit_2_before_any_device_work(corpora, tmp_path, tokenizer_path):
    cases = [
        (["--config.data.train=", "--config.data.mixture=web:0.7,math:0.3",
          f"--config.data.datasets=web={corpora / 'web'}"],
         "config.data.mixture names 'math'"),
        ([f"--config.data.train={corpora / 'web'}", "--config.data.seq_len=64"], "seq_len=32"),
        ([f"--config.data.train={corpora / 'web'}", "--config.data.mixture=web:1",
          f"--config.data.datasets=web={corpora / 'web'}"], "are both set"),
    ]
    for flags, match in cases:
        r = _train_cli(*flags, tmp_path=tmp_path)
        assert r.returncode == 2, (flags, r.stderr[-2000:])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and match in lines[0] and "Fix:" in lines[0], r.stderr[-2000:]
        assert not os.path.exists(tmp_path / "w" / "checkpoints")
    assert prepared.is_prepared(str(corpora / "web"))


def test_prepared_batches_equal_the_streamed_path_batch_for_batch(tmp_path, tokenizer_path):
    """``data.prepare`` + the Grain loader against the streamed packer (``PackedBatches`` over the documents held
    in memory), unshuffled, one pass: the same token ids, targets, positions, segment ids and loss weights, batch
    for batch (two implementations of the packing: ``pack_documents`` and ``PackedBatches``)."""
    from mistral_jax.data import loader, pipeline
    from mistral_jax.data.prepare import prepare
    from mistral_jax.data.tokenizer import Tokenizer

    corpus = os.path.join(ROOT, "mistral_jax", "data", "corpus", "pydoc_validation.jsonl")
    prepare(corpus, str(tmp_path / "p"), tokenizer=tokenizer_path, seq_len=SEQ, workers=1, progress=False)
    kept = tmp_path / "p" / "tokenizer.model"  # the tokenizer stays with its data (data.tokenizer="" reads it)
    assert kept.read_bytes() == open(tokenizer_path, "rb").read()
    grain_it = loader.GrainBatches([("v", prepared.open_dataset(str(tmp_path / "p")), 1.0)], 4, range(4),
                                   shuffle=False, loop=False)
    streamed = pipeline.PackedBatches(pipeline.open_source(corpus), Tokenizer(tokenizer_path), SEQ, 4, shuffle=False,
                                      loop=False)
    got, want = list(grain_it), list(streamed)
    assert len(got) == len(want) > 10
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == w[k].dtype and np.array_equal(g[k], w[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chat", "preference"])
def test_sft_and_dpo_train_on_prepared_data(kind, tiny_trained_run, tokenizer_path, tmp_path):
    """Instruction and preference data prepared once (loss masks / pair layout in the records): SFT and DPO
    train on it without tokenizing in the loop, and the checkpoint holds the prepared data's position."""
    from configs import tiny_dpo, tiny_sft
    from mistral_jax.data.prepare import prepare
    from mistral_jax.training import trainer

    name = "instruct_train" if kind == "chat" else "preference_train"
    corpus = os.path.join(ROOT, "mistral_jax", "data", "corpus", f"{name}.jsonl")
    cfg = (tiny_sft if kind == "chat" else tiny_dpo).get_config()
    seq = int(cfg.data.seq_len)
    dest = str(tmp_path / "prepared")
    m = prepare(corpus, dest, tokenizer=tokenizer_path, seq_len=seq, format=kind, workers=1, progress=False,
                pairs_per_row=int(cfg.data.get("pairs_per_row", 1) or 1), skip_invalid=True)
    assert m["kind"] == kind and m["rows"] > 0
    cfg.init_from = tiny_trained_run
    cfg.update_from_flattened_dict({"data.train": dest, "data.validation": "", "num_steps": 3, "log_every": 1,
                                    "eval_every": 0, "progress_bar": False, "checkpoint.async_save": False,
                                    "checkpoint.every_steps": 3, "optimizer.warmup_steps": 1})
    workdir = str(tmp_path / "run")
    assert trainer.train(cfg, workdir)["step"] == 3
    losses = run_losses(workdir)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    state = json.load(open(os.path.join(workdir, "checkpoints", "3", "data_state", "metadata")))
    assert state["kind"] == "prepared" and state["grain"]["next_index"] == 3
