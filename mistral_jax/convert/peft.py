"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, what ``peft.PeftModel.from_pretrained``
loads over the HF export of the base model.

Legend: L layers, E experts, R rank, I a weight's input features (D, or N*H for ``wo``), O its output features.

The project's adapter of a weight ``W`` [in..., out...] is ``A`` [in..., R], ``B`` [R, out...] with the update
``(alpha / R) * A @ B``; PEFT's of a torch ``Linear`` (weight [O, I]) is ``lora_A.weight`` [R, I],
``lora_B.weight`` [O, R] with the update ``(lora_alpha / r) * lora_B @ lora_A``. Every adapted weight's HF
transform (``convert/keys.py``) is a reshape to [I, O] and a transpose (HF's q / k rows are already our half-split
RoPE layout: no row permutation), so per layer (and expert)::

    lora_A.weight = A.reshape(I, R).T        lora_B.weight = B.reshape(R, O).T

under ``base_model.model.`` + the HF module name, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Mixtral's expert adapters keep HF's on-disk
per-expert names (``block_sparse_moe.experts.{e}.w1``), which PEFT converts as it loads them over transformers >= 5's
fused experts (``gate_up_proj`` = w1 and w3 side by side, ``down_proj`` = w2). PEFT 0.21 does so only for w2 alone
or w1, w2 and w3 together (w1 or w3 alone is refused, w1 + w3 without w2 loads as no adapter at all), so
``check_targets`` refuses the other sets first.

The output kind ``peft`` (these two files, nothing else) is a row of ``convert.paths.EXPORT_FILES``, so
``paths.atomic_dir`` writes it atomically (local, or on a bucket between its markers) and ``overwrite`` replaces
only a previous PEFT export.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mistral_jax import storage
from mistral_jax.config import ModelConfig
from mistral_jax.convert import dtypes
from mistral_jax.convert import files as fileio
from mistral_jax.convert import keys as keys_lib
from mistral_jax.convert import safetensors_io as st

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KIND = "peft"
PREFIX = "base_model.model."  # PeftModel's prefix before the transformers model's own names

# HF transforms that are ``W.reshape(I, O).T``: torch Linear weights [out, in], rows in our order
_LINEAR = ("transpose", "q_proj", "kv_proj", "o_proj")

# model parameter path -> (A [lead..., in..., R], B [lead..., R, out...])
Adapters = Mapping[tuple[str, ...], tuple[Any, Any]]


def _keys(cfg: ModelConfig) -> dict[tuple[str, ...], keys_lib.Key]:
    return {k.path: k for k in keys_lib.KEYS if k.applies(cfg)}


def module_name(key: keys_lib.Key) -> str:
    """The HF module a key's tensor belongs to, as PEFT's ``target_modules`` names it (``q_proj``, ``w1`` ...)."""
    return key.hf.rsplit(".", 2)[-2]


def check_targets(cfg: ModelConfig, targets: tuple[str, ...]) -> None:
    """Raise ``ValueError`` (one line, with the fix) if adapters of ``targets`` (model parameter names: ``wq`` ...,
    ``w1 w2 w3``) cannot be written as a PEFT adapter of ``cfg``'s HF model."""
    found = _keys(cfg)
    for t in targets:
        k = next((k for p, k in found.items() if p[-1] == t and p[0] == "layers"), None)
        if k is None or k.transform("hf") not in _LINEAR:
            family = "Mixtral" if cfg.is_moe else "Mistral"
            raise ValueError(f"LoRA target {t!r} has no HF Linear module in a {family} model, so a PEFT adapter "
                             "cannot hold it. Fix: export the run merged (mistral-jax-lora --to hf).")
    experts = sorted({"w1", "w2", "w3"} & set(targets)) if cfg.is_moe else []
    if experts not in ([], ["w2"], ["w1", "w2", "w3"]):
        raise ValueError(f"the adapters cover the Mixtral experts' {', '.join(experts)}, which PEFT cannot load over "
                         "transformers >= 5's fused experts: it takes expert adapters of w2 alone or of w1, w2 and w3 "
                         "together (w1 or w3 alone is refused; w1 and w3 without w2 load as no adapter at all). Fix: "
                         "export the run merged (mistral-jax-lora --to hf), or train with config.lora.targets "
                         "holding all of w1, w2, w3 (or w2 alone).")


def _factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lora_A.weight [R, I], lora_B.weight [O, R])`` of one slice ``A`` [in..., R], ``B`` [R, out...]."""
    r = a.shape[-1]
    return a.reshape(-1, r).T, b.reshape(r, -1).T  # [R, I], [O, R]


def tensors(cfg: ModelConfig, adapters: Adapters) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """``(PEFT name, shape, producer)`` of every adapter tensor, in the HF export's order (layer by layer, experts
    in order); ``producer()`` gives the tensor, read from ``adapters`` one slice at a time."""
    found = _keys(cfg)
    check_targets(cfg, tuple(p[-1] for p in adapters))
    for e in keys_lib.entries(cfg):
        if e.key.path not in adapters or found.get(e.key.path) is not e.key:
            continue
        a, b = adapters[e.key.path]
        out_f, in_f = e.file_shape("hf", cfg)  # torch Linear [out, in]
        r = a.shape[-1]
        lead = a.shape[: len(e.index)]
        if (tuple(lead) != tuple(e.param_shape[: len(e.index)]) or math.prod(a.shape[len(e.index):-1]) != in_f
                or b.shape[len(e.index)] != r or math.prod(b.shape[len(e.index) + 1:]) != out_f):
            raise ValueError(f"adapter of {'.'.join(e.key.path)} has A {tuple(a.shape)}, B {tuple(b.shape)}, which do "
                             f"not fit the model's weight {e.param_shape} (torch [{out_f}, {in_f}] per slice). Fix: "
                             "export adapters together with the base model they were trained on.")
        base = PREFIX + e.name("hf").removesuffix(".weight")

        def pick(i, e=e, a=a, b=b):
            return _factors(np.asarray(a[e.index], np.float32), np.asarray(b[e.index], np.float32))[i]

        yield base + ".lora_A.weight", (r, in_f), lambda pick=pick: pick(0)
        yield base + ".lora_B.weight", (out_f, r), lambda pick=pick: pick(1)


def adapter_config(cfg: ModelConfig, targets: tuple[str, ...], rank: int, alpha: float,
                   base_model: str | None) -> dict[str, Any]:
    """``adapter_config.json``: a ``peft.LoraConfig`` of the adapters (plain LoRA: no dropout, bias, DoRA or
    rsLoRA; the scale is ``lora_alpha / r`` as the project's ``alpha / rank``)."""
    found = _keys(cfg)
    modules = sorted({module_name(k) for p, k in found.items() if p[0] == "layers" and p[-1] in targets})
    lora_alpha: float | int = int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else float(alpha)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": int(rank), "lora_alpha": lora_alpha, "target_modules": modules, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "revision": None}


def write(out_dir: str | os.PathLike, cfg: ModelConfig, adapters: Adapters, *, rank: int, alpha: float,
          base_model: str | None = None, dtype: str | None = None) -> None:
    """Write the PEFT adapter of ``adapters`` into the (empty, temporary) directory ``out_dir`` (local, or the
    export's place on a bucket: ``paths.atomic_dir``), tensor by tensor.

    Args:
      out_dir: where to write ``adapter_config.json`` and ``adapter_model.safetensors``.
      cfg: the base model's config.
      adapters: model parameter path (``("layers", "attention", "wq")``) -> ``(A, B)`` of every adapted weight,
        ``A`` [L, (E,) in..., R] and ``B`` [L, (E,) R, out...] (numpy or jax arrays).
      rank, alpha: the adapters' rank and scale numerator (the update is ``alpha / rank * A @ B``).
      base_model: ``base_model_name_or_path`` (the base's path or hub id), or None.
      dtype: the tensors' dtype (``float32`` when None).
    """
    out_dir = os.fspath(out_dir)
    code = st.dtype_code(dtypes.np_dtype(dtype or "float32"))
    items = list(tensors(cfg, adapters))
    if not items:
        raise ValueError("no adapter to write. Fix: pass the adapters of a LoRA model (apply_lora, not merged).")
    st.write_file(storage.join(out_dir, WEIGHTS), [(name, code, shape) for name, shape, _ in items],
                  (make() for _, _, make in items), metadata={"format": "pt"})
    targets = tuple(p[-1] for p in adapters)
    fileio.write_json(storage.join(out_dir, CONFIG), adapter_config(cfg, targets, rank, alpha, base_model), indent=2)
