"""Named Mistral tokenizers (``mistral:v1`` ...): resolved offline to the files mistral-common ships, encoding as
mistral-common's own tokenizer does; the production configs name Mistral's real 32k tokenizer."""

import os
import sys

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import mistral_jax as mj
from configs import mistral_7b, mistral_7b_instruct, mixtral_8x7b, mixtral_8x7b_instruct
from mistral_jax.data import tokenizer as tok_lib


def validate_config(cfg, **kw):
    """The run-config check (``training.run`` after the recipe refactor, ``training.trainer`` before)."""
    try:
        from mistral_jax.training.run import validate_config as check
    except ImportError:
        from mistral_jax.training.trainer import validate_config as check
    return check(cfg, **kw)


def run_tokenizer(cfg, workdir):
    """The tokenizer a run of ``cfg`` uses (``Recipe.tokenizer`` after the recipe refactor, ``sft.tokenizer``
    before)."""
    try:
        from mistral_jax.training import recipe
    except ImportError:
        from mistral_jax.training import sft

        return sft.tokenizer(cfg, workdir)
    return recipe.choose(cfg).tokenizer(workdir, None)


TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnewlines", "[INST] What is 2 + 2? [/INST]",
         "Ünïcödé — 東京 🙂", "def f(x):\n    return x ** 2", ""]


@pytest.mark.parametrize("name, version, pieces", [("mistral:v1", "v1", 32000), ("mistral:v3", "v3", 32768)])
def test_named_tokenizer_resolves_offline_and_encodes_like_mistral_common(name, version, pieces, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = mj.Tokenizer(name)
    ref = getattr(MistralTokenizer, version)().instruct_tokenizer.tokenizer  # mistral-common's SentencePieceTokenizer
    assert tok.name == name and os.path.isfile(tok.path)
    assert os.path.samefile(tok.path, ref.file_path)  # the file shipped inside the mistral_common package
    package_dir = os.path.dirname(sys.modules["mistral_common"].__file__)
    assert os.path.commonpath([os.path.realpath(tok.path), os.path.realpath(package_dir)]) == os.path.realpath(
        package_dir)
    assert tok.vocab_size == ref.n_words == pieces
    assert (tok.bos_id, tok.eos_id) == (ref.bos_id, ref.eos_id) == (1, 2)
    for text in TEXTS:
        for bos, eos in ((True, False), (False, True)):
            ids = tok.encode(text, bos=bos, eos=eos)
            assert ids == ref.encode(text, bos=bos, eos=eos), text
            arr = tok.encode_array(text, bos=bos, eos=eos)  # prepare's path: sentencepiece writes the array
            assert arr.dtype == np.int32 and arr.tolist() == ids, text
        assert tok.decode(tok.encode(text, bos=False)) == ref.decode(ref.encode(text, bos=False, eos=False))
    assert tok_lib.resolve(name) == tok.path


def test_mistral_v1_is_the_32k_vocabulary_of_mistral_7b():
    tok = mj.Tokenizer("mistral:v1")
    assert tok.vocab_size == mj.ModelConfig.mistral_7b_v01().vocab_size == mj.ModelConfig.mixtral_8x7b().vocab_size
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.encode("Hello") == [1, 22557]  # Mistral 7B's ids (the same as HF's LlamaTokenizer for the model)


@pytest.mark.parametrize("name", ["mistral:v4", "mistral:", "mistral:tekkenx"])
def test_unknown_name_is_one_line_with_the_fix(name):
    with pytest.raises(ValueError, match=rf"^unknown Mistral tokenizer '{name}'\. Fix: use one of mistral:v1 "
                                         r"\(32000 pieces.*mistral:v3 \(32768.*mistral:tekken \(131072.*"
                                         r"or the path of a sentencepiece") as e:
        mj.Tokenizer(name)
    assert "\n" not in str(e.value)


def test_missing_mistral_common_is_one_line_with_the_fix(monkeypatch):
    for mod in [m for m in sys.modules if m == "mistral_common" or m.startswith("mistral_common.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # import mistral_common -> ImportError
    with pytest.raises(ValueError, match=r"^tokenizer 'mistral:v1' needs the mistral-common package.*"
                                         r"Fix: pip install 'mistral-common>=1.13'") as e:
        mj.Tokenizer("mistral:v1")
    assert "\n" not in str(e.value)


def test_paths_still_work(tmp_path):
    path = mj.Tokenizer("mistral:v1").path
    assert mj.Tokenizer(path).encode("Hello") == [1, 22557]
    with pytest.raises(FileNotFoundError, match="sentencepiece model not found"):
        mj.Tokenizer(tmp_path / "nope.model")


@pytest.mark.parametrize("module, n_devices", [(mistral_7b, 64), (mixtral_8x7b, 64)])
def test_production_configs_name_mistral_v1_and_validate(module, n_devices):
    cfg = module.get_config()
    assert cfg.data.tokenizer == "mistral:v1"
    model_cfg = validate_config(cfg, n_devices=n_devices, process_count=16)  # v5p-128: 64 chips, 16 hosts
    assert mj.Tokenizer(cfg.data.tokenizer).vocab_size == model_cfg.vocab_size == 32000


@pytest.mark.parametrize("module", [mistral_7b_instruct, mixtral_8x7b_instruct])
def test_instruct_configs_take_the_base_checkpoints_tokenizer(module, tmp_path):
    # Fine-tuning keeps the ids the base weights were trained with: data.tokenizer = "" reads init_from's
    # tokenizer.model (for Mistral-7B-v0.1 / Mixtral-8x7B-v0.1 that file is mistral:v1); a name overrides it.
    cfg = module.get_config()
    assert cfg.data.tokenizer == "" and cfg.data.format == "chat"
    ckpt = tmp_path / "base"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")  # an HF checkpoint dir, as far as finding its tokenizer goes
    (ckpt / "model.safetensors").write_bytes(b"")
    with open(mj.Tokenizer("mistral:v1").path, "rb") as f:
        (ckpt / "tokenizer.model").write_bytes(f.read())
    cfg.init_from = str(ckpt)
    work = tmp_path / "work"
    work.mkdir()
    tok = run_tokenizer(cfg, str(work))
    assert tok.vocab_size == 32000 and tok.encode("Hello") == [1, 22557]
    assert (work / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    cfg.data.tokenizer = "mistral:v1"  # named explicitly: the same file, copied into the workdir as the run's
    tok = run_tokenizer(cfg, str(tmp_path / "work"))
    assert tok.name == "mistral:v1" and tok.vocab_size == 32000



def test_command_line_tools_accept_named_tokenizers():
    """``--tokenizer mistral:v1`` (generate, eval.py) resolves to the shipped file; an unknown name is one line."""
    from mistral_jax import cli

    assert cli.check_tokenizer("mistral:v1", "unused", "hf") == tok_lib.named_tokenizer_path("mistral:v1")
    with pytest.raises(cli.UsageError, match=r"--tokenizer='mistral:v9' cannot be used: unknown .*Fix: use one of"):
        cli.check_tokenizer("mistral:v9", "unused", "hf")


@pytest.mark.heavy  # 3-5 s on 2 busy cores: the light tier stays near its 90 s
def test_tekken_through_the_one_tokenizer_interface(monkeypatch, tmp_path):
    """mistral:tekken (Mistral NeMo's tiktoken-based vocabulary) works through mj.Tokenizer: encode / decode /
    vocab size / bos / eos / pad as mistral-common's Tekkenizer; literal control text stays text; the format is
    read from the content, so the file still loads when copied as tokenizer.model (a training workdir)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = mj.Tokenizer("mistral:tekken")
    ref = MistralTokenizer.v3(is_tekken=True).instruct_tokenizer.tokenizer
    assert tok.kind == "tekken" and tok.sp is None and tok.instruct_version == "v3"
    assert os.path.samefile(tok.path, ref.file_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (ref.n_words, 1, 2, ref.pad_id) == (131072, 1, 2, 11)
    assert tok.vocab_size == mj.ModelConfig.mistral_nemo_12b().vocab_size
    for text in TEXTS + ["literal <s> </s> [INST] [/INST]"]:
        for bos, eos in ((True, False), (False, True)):
            assert tok.encode(text, bos=bos, eos=eos) == ref.encode(text, bos=bos, eos=eos), text
            arr = tok.encode_array(text, bos=bos, eos=eos)
            assert arr.dtype == np.int32 and arr.tolist() == ref.encode(text, bos=bos, eos=eos), text
        ids = tok.encode(text, bos=False)
        assert tok.decode(ids) == text and not any(tok.is_special(i) for i in ids)
    assert tok.piece_to_id("[INST]") == 3 and tok.piece_to_id("[/INST]") == 4 and tok.id_to_piece(3) == "[INST]"
    assert tok.filename == "tekken.json"
    copied = tmp_path / "tokenizer.model"
    copied.write_bytes(open(tok.path, "rb").read())
    again = mj.Tokenizer(copied)
    assert again.kind == "tekken" and again.encode("Hello") == tok.encode("Hello")
    d = tmp_path / "export"
    d.mkdir()
    tok.save(d)
    assert mj.Tokenizer.find(d).kind == "tekken" and tok_lib.resolve(d) == str(d / "tekken.json")


@pytest.mark.parametrize("name, version", [("mistral:v1", "v1"), ("mistral:v3", "v3"), ("mistral:v7", "v7")])
def test_instruct_version_is_known_from_the_file_content(name, version, tmp_path):
    """A Mistral sentencepiece file copied as tokenizer.model (checkpoints, workdirs) keeps its chat format."""
    tok = mj.Tokenizer(name)
    assert tok.instruct_version == version
    copied = tmp_path / "tokenizer.model"
    copied.write_bytes(open(tok.path, "rb").read())
    assert mj.Tokenizer(copied).instruct_version == version
