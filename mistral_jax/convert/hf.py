"""HF transformers checkpoints: ``config.json`` + ``model*.safetensors`` (+ index), both directions.

Reading accepts what ``save_pretrained`` writes (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``) with the on-disk names (Mixtral: ``block_sparse_moe.experts.N.w1``).
Writing streams tensor by tensor into shards of at most ``max_shard_size`` bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
from typing import Any

from mistral_jax import storage
from mistral_jax.config import ModelConfig
from mistral_jax.convert import dtypes, sources, tokenizer_files, writing
from mistral_jax.convert import files as fileio
from mistral_jax.convert import keys as keys_lib

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(path: str) -> ModelConfig:
    """``ModelConfig`` from an HF directory's ``config.json`` (model_type must be mistral or mixtral)."""
    return sources.read_json_config(path, CONFIG, ModelConfig.from_hf,
                                   "an HF checkpoint directory (config.json + model*.safetensors)")


def inside_dir(name: str) -> bool:
    """Whether an index entry names a file inside the checkpoint directory: relative, no ``..``, not empty.

    The check is on the name only: a shard that is itself a symlink (as in the HF hub cache, whose snapshot
    files point into ``../../blobs/``) is still read.
    """
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in name:
        return False
    parts = name.replace("\\", "/").split("/")
    return ".." not in parts and os.path.normpath(name) not in (".", "")


def open_source(path: str, cfg: ModelConfig | None = None) -> sources.FileSource:
    """A checked tensor source over an HF directory. Raises one ``ConversionError`` listing every problem."""
    path = os.fspath(path)
    cfg = cfg or read_config(path)
    index_path = storage.join(path, INDEX)
    weight_map = None
    if fileio.is_file(index_path):
        try:
            weight_map = fileio.read_json(index_path)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path!r} is not a safetensors index ({e!r}). Fix: re-download it.") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path!r}: 'weight_map' must map tensor names to file names. Fix: re-download "
                             "or re-export the checkpoint.")
        outside = sorted({f for f in weight_map.values() if not inside_dir(f)})
        sources.check_or_raise([f"{index_path}: the index names {f!r}, which is not a file of the checkpoint directory"
                               for f in outside], f"HF checkpoint {path}",
                              "an index may only name shard files inside its own directory (plain file names such "
                              "as model-00001-of-00002.safetensors); re-download or re-export the checkpoint")
        files = [storage.join(path, f) for f in sorted(set(weight_map.values()))]
    elif fileio.is_file(storage.join(path, SINGLE)):
        files = [storage.join(path, SINGLE)]
    else:
        have = fileio.listdir(path)
        bins = [f for f in have if f.endswith(".bin")]
        fix = ("convert the .bin files to safetensors first (transformers: model.save_pretrained(dir))" if bins
               else "point at a directory holding model.safetensors or model.safetensors.index.json")
        raise FileNotFoundError(f"{path!r} has no {SINGLE} or {INDEX} (files: {have}). Fix: {fix}.")
    index = sources.TensorIndex(files, weight_map)
    sources.check_or_raise(index.check(cfg, "hf"), f"HF checkpoint {path}",
                          "the tensors must match config.json; re-download or re-export the checkpoint, or fix "
                          "config.json")
    return sources.FileSource(cfg, index, "hf")


def hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """``config.json`` contents (``ModelConfig.to_hf``, with the 5.x ``dtype`` key as well)."""
    d = cfg.to_hf(dtype)
    d["dtype"] = dtype
    return d


# Mistral's instruct formats as HF chat templates (jinja). Each reproduces mistral-common's segments: with the
# legacy sentencepiece normalisation (a "▁" before every text run between special tokens, as mistral-common
# encodes every segment on its own) or tekken's byte-level BPE, ``apply_chat_template`` gives
# ``encode_chat_completion``'s ids; tests/test_family.py checks it on varied conversations.
_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}")
CHAT_TEMPLATE_V1 = (  # mistral-common InstructTokenizerV1: the system prompt folded into the first user turn
    _SPLIT_SYSTEM + "{{- bos_token }}{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}{%- if loop.first and system %}{{- '[INST] ' + system + '\n\n' + m['content'] + "
    "' [/INST]' }}{%- else %}{{- '[INST] ' + m['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] }}{%- if not (loop.last and continue_final_message "
    "is defined and continue_final_message) %}{{- eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}")
CHAT_TEMPLATE_V3 = (  # InstructTokenizerV3 (v2 / v3 / tekken): control tokens, the system prompt before the last user
    _SPLIT_SYSTEM + "{%- set ns = namespace(last_user=-1) %}{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}{%- if loop.index0 == ns.last_user and system %}{{- '[INST]' + system + '\n\n' + "
    "m['content'] + '[/INST]' }}{%- else %}{{- '[INST]' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' %}{{- m['content'].rstrip(' ') }}{%- if not (loop.last and "
    "continue_final_message is defined and continue_final_message) %}{{- eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}")
CHAT_TEMPLATES = {"v1": CHAT_TEMPLATE_V1, "v2": CHAT_TEMPLATE_V3, "v3": CHAT_TEMPLATE_V3}


def chat_template(version: str) -> str | None:
    """The HF chat template of a Mistral instruct version (None for one without a template here, e.g. v7)."""
    return CHAT_TEMPLATES.get(version)


def tokenizer_config(cfg: ModelConfig, tokenizer: Any = None, with_tokenizer_json: bool = False) -> dict[str, Any]:
    """A ``tokenizer_config.json`` for loading the exported tokenizer with transformers.

    Sentencepiece: ``LlamaTokenizer`` with ``legacy: true`` (a ``▁`` before every text run, as mistral-common
    encodes every segment on its own; ``legacy: false`` changes the ids after ``<s>`` and drops the leading ``▁``
    of text that starts with whitespace), the control pieces declared special (v3's ``[INST]`` = 3 ...).
    With ``tokenizer`` (a ``mistral_jax.Tokenizer``), the chat template of its Mistral instruct version. With
    ``with_tokenizer_json`` (an exact ``tokenizer.json`` is written next to it), ``PreTrainedTokenizerFast``, which
    uses that file as it is (``LlamaTokenizer`` would swap in its own pre-tokenizer).
    """
    d: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "add_prefix_space": True, "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len,
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
    }
    if tokenizer is None:
        return d
    if tokenizer.kind == "tekken":
        d.update(pad_token="<pad>", add_prefix_space=False)
        for k in ("legacy", "sp_model_kwargs"):
            d.pop(k)
    if with_tokenizer_json:  # the exact pipeline is in tokenizer.json; LlamaTokenizer would replace its normaliser
        d["tokenizer_class"] = "PreTrainedTokenizerFast"
    d["added_tokens_decoder"] = {str(i): {"content": tokenizer.id_to_piece(i), "special": True, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False}
                                 for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)}
    template = chat_template(tokenizer.instruct_version)
    if template is not None:
        d["chat_template"] = template
    return d


def tekken_tokenizer_json(tokenizer: Any) -> dict[str, Any] | None:
    """An HF ``tokenizer.json`` for a tekken file (byte-level BPE, the tekken split pattern, the 1000 special ids
    first) via transformers' ``MistralConverter``; None when transformers / tokenizers are not installed."""
    try:
        from tokenizers import processors
        from transformers.integrations.mistral.tokenizer import MistralConverter
    except ImportError:
        return None
    tok = MistralConverter(vocab_file=tokenizer.path).converted()
    bos = tokenizer.id_to_piece(tokenizer.bos_id)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tokenizer.bos_id)])])
    return json.loads(tok.to_str())


def tokenizer_json(kind: str, tokenizer_file: str) -> dict[str, Any] | None:
    """The fast tokenizer's ``tokenizer.json`` of a local ``tokenizer.model`` / ``tekken.json`` (None where none can
    be built). The slow part of the tokenizer files (about 0.6 s for a 32k sentencepiece vocabulary), so
    :func:`write` builds it while the tensors are being written."""
    from mistral_jax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_file)
    return tekken_tokenizer_json(tok) if kind == "tekken" else tokenizer_files.sentencepiece_tokenizer_json(tok)


_NOT_BUILT = object()


def write_tokenizer_files(out_dir: str, cfg: ModelConfig, kind: str, tokenizer_file: str,
                          tj: dict[str, Any] | None | object = _NOT_BUILT) -> None:
    """The HF tokenizer files next to the copied ``tokenizer.model`` / ``tekken.json``: ``tokenizer_config.json``
    (with the chat template), ``special_tokens_map.json``, ``tokenizer.json`` when it can be built, and for a
    sentencepiece model of a later Mistral version also ``tokenizer.model.<version>`` (mistral-common's name,
    which its loaders and transformers' ``MistralCommonBackend`` read the version from).

    ``tokenizer_file`` is a local copy of the tokenizer (the one copied into ``out_dir``, which may be a bucket);
    ``tj`` its :func:`tokenizer_json` where the caller built it already.
    """
    from mistral_jax.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_file)
    if tj is _NOT_BUILT:
        tj = tokenizer_json(kind, tokenizer_file)
    if tj is not None:
        fileio.write_json(storage.join(out_dir, "tokenizer.json"), tj, ensure_ascii=False)
    fileio.write_json(storage.join(out_dir, "tokenizer_config.json"),
                         tokenizer_config(cfg, tok, with_tokenizer_json=tj is not None), indent=2)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if kind == "tekken":
        specials["pad_token"] = "<pad>"
    fileio.write_json(storage.join(out_dir, "special_tokens_map.json"), specials, indent=2)
    if kind == "sentencepiece" and tok.instruct_version != "v1":
        fileio.copy_file(tokenizer_file, storage.join(out_dir, f"tokenizer.model.{tok.instruct_version}"))


def write(out_dir: str, source: sources.Source, *, dtype: str | None = None, tokenizer: Any = None,
          max_shard_size: int | str = "5GB") -> None:
    """Write an HF checkpoint of ``source`` into the (empty, temporary) directory ``out_dir`` (local, or the
    export's place on a bucket: see ``convert.paths.atomic_dir``).

    ``tokenizer.json`` is built in a second thread while the tensors are written (those are mostly kernel copies
    or numpy work, which leave the interpreter free), then written after them."""
    cfg = source.cfg
    es = keys_lib.entries(cfg)
    out_dtype = dtype or dtypes.dtype_name(source.dtype(es[0]))
    kind = tokenizer_files.copy_tokenizer(tokenizer, out_dir)
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(1) as pool:
        if kind is not None:
            local = stack.enter_context(storage.local_copy_for_reading(tokenizer_files.source_file(tokenizer)))
            tj = pool.submit(tokenizer_json, kind, local)
        weight_map, sizes = writing.write_tensors(out_dir, source, "hf", dtype, [SINGLE], max_shard_size)
        files = sorted(set(weight_map.values()))
        if len(files) > 1:
            total = sum(sizes[f] for f in files)
            fileio.write_json(storage.join(out_dir, INDEX), {"metadata": {"total_size": total},
                                                                "weight_map": weight_map}, indent=2, sort_keys=True)
        fileio.write_json(storage.join(out_dir, CONFIG), hf_config(cfg, out_dtype), indent=2, sort_keys=True)
        fileio.write_json(storage.join(out_dir, "generation_config.json"), {"bos_token_id": 1, "eos_token_id": 2},
                          indent=2)
        if kind is not None:
            write_tokenizer_files(out_dir, cfg, kind, local, tj.result())
