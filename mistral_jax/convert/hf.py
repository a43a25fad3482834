"""HF transformers checkpoints: ``config.json`` + ``model*.safetensors`` (+ index), both directions.

Reading accepts what ``save_pretrained`` writes (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``) with the on-disk names (Mixtral: ``block_sparse_moe.experts.N.w1``).
Writing streams tensor by tensor into shards of at most ``max_shard_size`` bytes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mistral_jax.config import ModelConfig
from mistral_jax.convert import common

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_config(path: str) -> ModelConfig:
    """``ModelConfig`` from an HF directory's ``config.json`` (model_type must be mistral or mixtral)."""
    return common.read_json_config(path, CONFIG, ModelConfig.from_hf,
                                   "an HF checkpoint directory (config.json + model*.safetensors)")


def stored_dtype(path: str) -> str | None:
    """The ``dtype`` / ``torch_dtype`` recorded in ``config.json`` (None if absent)."""
    with open(os.path.join(path, CONFIG)) as f:
        d = json.load(f)
    return d.get("dtype") or d.get("torch_dtype")


def inside_dir(name: str) -> bool:
    """Whether an index entry names a file inside the checkpoint directory: relative, no ``..``, not empty.

    The check is on the name only: a shard that is itself a symlink (as in the HF hub cache, whose snapshot
    files point into ``../../blobs/``) is still read.
    """
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in name:
        return False
    parts = name.replace("\\", "/").split("/")
    return ".." not in parts and os.path.normpath(name) not in (".", "")


def open_source(path: str, cfg: ModelConfig | None = None) -> common.FileSource:
    """A checked tensor source over an HF directory. Raises one ``ConversionError`` listing every problem."""
    path = os.fspath(path)
    cfg = cfg or read_config(path)
    index_path = os.path.join(path, INDEX)
    weight_map = None
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_path!r} is not a safetensors index ({e!r}). Fix: re-download it.") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path!r}: 'weight_map' must map tensor names to file names. Fix: re-download "
                             "or re-export the checkpoint.")
        outside = sorted({f for f in weight_map.values() if not inside_dir(f)})
        common.check_or_raise([f"{index_path}: the index names {f!r}, which is not a file of the checkpoint directory"
                               for f in outside], f"HF checkpoint {path}",
                              "an index may only name shard files inside its own directory (plain file names such "
                              "as model-00001-of-00002.safetensors); re-download or re-export the checkpoint")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    elif os.path.isfile(os.path.join(path, SINGLE)):
        files = [os.path.join(path, SINGLE)]
    else:
        have = sorted(os.listdir(path))
        bins = [f for f in have if f.endswith(".bin")]
        fix = ("convert the .bin files to safetensors first (transformers: model.save_pretrained(dir))" if bins
               else "point at a directory holding model.safetensors or model.safetensors.index.json")
        raise FileNotFoundError(f"{path!r} has no {SINGLE} or {INDEX} (files: {have}). Fix: {fix}.")
    index = common.TensorIndex(files, weight_map)
    common.check_or_raise(index.check(cfg, "hf"), f"HF checkpoint {path}",
                          "the tensors must match config.json; re-download or re-export the checkpoint, or fix "
                          "config.json")
    return common.FileSource(cfg, index, "hf")


def hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """``config.json`` contents (``ModelConfig.to_hf``, with the 5.x ``dtype`` key as well)."""
    d = cfg.to_hf(dtype)
    d["dtype"] = dtype
    return d


def tokenizer_config(cfg: ModelConfig) -> dict[str, Any]:
    """A ``tokenizer_config.json`` for loading ``tokenizer.model`` with transformers' ``LlamaTokenizer``."""
    return {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len,
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
    }


def write(out_dir: str, source: common.Source, *, dtype: str | None = None, tokenizer: Any = None,
          max_shard_size: int | str = "5GB") -> None:
    """Write an HF checkpoint of ``source`` into the (empty, temporary) directory ``out_dir``."""
    cfg = source.cfg
    es = common.keys_lib.entries(cfg)
    out_dtype = dtype or common.dtype_name(source.dtype(es[0]))
    weight_map = common.write_tensors(out_dir, source, "hf", dtype, [SINGLE], max_shard_size)
    files = sorted(set(weight_map.values()))
    if len(files) > 1:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(hf_config(cfg, out_dtype), f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    if common.copy_tokenizer(tokenizer, out_dir) == "sentencepiece":  # LlamaTokenizer reads tokenizer.model
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config(cfg), f, indent=2)
        with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
