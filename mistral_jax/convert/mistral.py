"""Mistral's consolidated format: ``params.json`` + ``consolidated.safetensors`` (mistral-inference), both ways.

Names and layout are those of mistral-inference (see :mod:`mistral_jax.convert.keys`): ``tok_embeddings``,
``layers.N.attention.wq`` (interleaved RoPE rows), ``feed_forward.w1`` or, for MoE,
``feed_forward.gate`` + ``feed_forward.experts.E.w1``, ``norm``, ``output``. mistral-inference loads one
``consolidated.safetensors``; reading also accepts several ``consolidated*.safetensors`` files.
Legacy ``consolidated.00.pth`` pickles are not read (they need torch): convert them with
``safetensors.torch.save_file(torch.load(...), "consolidated.safetensors")`` first.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from mistral_jax import storage
from mistral_jax.config import ModelConfig
from mistral_jax.convert import files as fileio
from mistral_jax.convert import sources, tokenizer_files, writing

PARAMS = "params.json"
WEIGHTS = "consolidated.safetensors"


def read_config(path: str) -> ModelConfig:
    """``ModelConfig`` from ``params.json``."""
    return sources.read_json_config(path, PARAMS, ModelConfig.from_mistral_params,
                                   "a Mistral consolidated directory (params.json + consolidated.safetensors)")


def open_source(path: str, cfg: ModelConfig | None = None) -> sources.FileSource:
    """A checked tensor source over a consolidated directory; one ``ConversionError`` lists every problem."""
    path = os.fspath(path)
    cfg = cfg or read_config(path)
    have = fileio.listdir(path)
    files = [storage.join(path, n) for n in have
             if fnmatch.fnmatchcase(n, "consolidated*.safetensors") and fileio.is_file(storage.join(path, n))]
    if not files:
        pth = [f for f in have if f.endswith(".pth")]
        fix = ("convert the .pth file to safetensors first: safetensors.torch.save_file(torch.load(f), "
               f"'{WEIGHTS}')" if pth else f"point at a directory holding {WEIGHTS}")
        raise FileNotFoundError(f"{path!r} has no {WEIGHTS} (files: {have}). Fix: {fix}.")
    index = sources.TensorIndex(files)
    sources.check_or_raise(index.check(cfg, "mistral"), f"Mistral checkpoint {path}",
                          "the tensors must match params.json; re-download or re-export the checkpoint")
    return sources.FileSource(cfg, index, "mistral")


def write(out_dir: str, source: sources.Source, *, dtype: str | None = None, tokenizer: Any = None) -> None:
    """Write ``params.json`` + ``consolidated.safetensors`` (streamed) into the (temporary) ``out_dir``, or the
    export's place on a bucket."""
    writing.write_tensors(out_dir, source, "mistral", dtype, [WEIGHTS], None)
    fileio.write_json(storage.join(out_dir, PARAMS), source.cfg.to_mistral_params(), indent=2)
    tokenizer_files.copy_tokenizer(tokenizer, out_dir)
