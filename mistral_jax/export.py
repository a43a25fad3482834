"""Export and conversion: ``save_hf`` / ``save_mistral`` / ``save_jax`` of a model, ``convert`` between the formats.

The file formats themselves (readers, writers, key tables, output-path safety) live in ``mistral_jax.convert``;
reading any checkpoint lives in ``mistral_jax.loading``; this module sits above both.

``convert("hf", "mistral", in_dir, out_dir)`` streams tensor by tensor between the file formats (host
memory: about one tensor; the output is written shard by shard); converting to or from ``jax`` goes through
the model's parameters (placed sharded on a ``mesh`` when one is given). Every output directory is written
to a temporary sibling and renamed into place, so a failed conversion leaves nothing behind (and one that was
killed leaves a temporary directory that the next conversion into the same place removes).

Nothing is lost (``convert.paths``): an output may not be an input, lie inside one or contain one (real paths,
symlinks resolved), and ``overwrite`` only replaces a previous export of the same kind, never a training run or
any other directory. Tokenizers are checked to be sentencepiece / tekken models before they are copied.

Inputs and outputs may be on a bucket (``gs://``, ``s3://``; checked with ``storage.check_bucket`` before anything
is read or written). A bucket has no rename: an export there is written in place and is complete once its
marker ``mistral_jax_export.json`` (every file with its size) is written, last; until then
``mistral_jax_export.incomplete`` is there and readers refuse it (``convert.paths``). Conversions still stream:
safetensors are read with ranged reads, tensor by tensor, and written straight into the bucket, shard by shard;
nothing is staged on the local disk.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from mistral_jax import sharding, storage
from mistral_jax.convert import build, dtypes, files, hf, mistral, native, paths, sources, tokenizer_files, writing
from mistral_jax.convert.sources import ConversionError
from mistral_jax.loading import (
    FORMATS,
    _cfg_of,
    input_dirs,
    known_tokenizer,
    lora_run,
    open_checkpoint,
    open_source,
    sources_of,
    tokenizer_path,
)
from mistral_jax.model.transformer import params_dict

__all__ = ["ConversionError", "convert", "save_hf", "save_jax", "save_mistral", "save_peft"]


def _source_of(model: Any) -> sources.ParamsSource:
    return sources.ParamsSource(_cfg_of(model), params_dict(model))


def _tokenizer(model: Any, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    return known_tokenizer(model)


def _guard(model: Any, tokenizer: Any) -> dict[str, Any]:
    """What an export of ``model`` must not overwrite: the directories it was loaded from, and the tokenizer file."""
    tok = None if tokenizer is None else os.fspath(getattr(tokenizer, "path", tokenizer))
    return {"inputs": sources_of(model), "files": [tok] if tok else []}


def save_hf(model: Any, out_dir: str | os.PathLike, *, dtype: str | None = None, tokenizer: Any = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False) -> str:
    """Export ``model`` as an HF transformers checkpoint (loadable with ``AutoModelForCausalLM.from_pretrained``).

    Writes ``config.json`` (MistralConfig / MixtralConfig), ``model.safetensors`` or shards
    ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``, ``generation_config.json`` and,
    when a tokenizer is known, ``tokenizer.model`` + ``tokenizer_config.json`` (LlamaTokenizer).

    Args:
      model: a ``Transformer``.
      out_dir: the directory to create (absent or empty unless ``overwrite``), local or ``gs://`` / ``s3://``;
        never the directory the model was loaded from, inside it or a parent of it.
      dtype: ``"float32"`` / ``"bfloat16"`` / ``"float16"``; None keeps the parameters' dtype.
      tokenizer: a ``Tokenizer``, a ``tokenizer.model`` path or a directory; default: the one of the
        directory the model was loaded from, if any.
      max_shard_size: bytes per shard (int, or ``"5GB"`` / ``"500MiB"``).
      overwrite: replace a previous HF export at ``out_dir`` (anything else is never replaced).

    Returns:
      ``out_dir``.

    Raises:
      convert.paths.OutputPathError: ``out_dir`` overlaps the model's source directory or the tokenizer.
      convert.paths.OutputExistsError: ``out_dir`` is not empty (without ``overwrite``), or not a previous HF
        export (a training run, another checkpoint...).
      storage.StorageError: a bucket ``out_dir`` whose bucket does not exist or cannot be reached.
    """
    tok = _tokenizer(model, tokenizer)
    if dtype is not None:
        dtypes.np_dtype(dtype)  # validate before writing anything
    with paths.atomic_dir(out_dir, overwrite, "hf", **_guard(model, tok)) as tmp:
        source = _source_of(model)
        hf.write(tmp, source, dtype=dtype, tokenizer=tok, max_shard_size=max_shard_size)
    return os.fspath(out_dir)


def save_mistral(model: Any, out_dir: str | os.PathLike, *, dtype: str | None = None, tokenizer: Any = None,
                 overwrite: bool = False) -> str:
    """Export ``model`` in Mistral's consolidated format (``params.json`` + ``consolidated.safetensors``).

    Args:
      model: a ``Transformer``.
      out_dir: the directory to create (absent or empty unless ``overwrite``), local or ``gs://`` / ``s3://``.
      dtype: output dtype; None keeps the parameters' dtype.
      tokenizer: as for :func:`save_hf`; copied as ``tokenizer.model``.
      overwrite: replace a previous Mistral export at ``out_dir`` (as for :func:`save_hf`).

    Returns:
      ``out_dir``.
    """
    tok = _tokenizer(model, tokenizer)
    if dtype is not None:
        dtypes.np_dtype(dtype)  # validate before writing anything
    with paths.atomic_dir(out_dir, overwrite, "mistral", **_guard(model, tok)) as tmp:
        source = _source_of(model)
        mistral.write(tmp, source, dtype=dtype, tokenizer=tok)
    return os.fspath(out_dir)


def save_jax(model: Any, out_dir: str | os.PathLike, tokenizer: Any = None, *, overwrite: bool = False) -> str:
    """Export ``model`` as a mistral_jax export dir (``model_config.json`` + Orbax ``params/``).

    Args:
      model: a ``Transformer``.
      out_dir: the directory to create (absent or empty unless ``overwrite``), local or ``gs://`` / ``s3://``
        (Orbax writes the arrays there itself).
      tokenizer: as for :func:`save_hf`; copied as ``tokenizer.model``.
      overwrite: replace a previous mistral_jax export at ``out_dir`` (as for :func:`save_hf`).

    Returns:
      ``out_dir``.
    """
    tok = _tokenizer(model, tokenizer)
    with paths.atomic_dir(out_dir, overwrite, "jax", **_guard(model, tok)) as tmp:
        source = _source_of(model)
        native.write(tmp, source.cfg, source.params, tokenizer=tok)
    return os.fspath(out_dir)


def save_peft(lora_model: Any, out_dir: str | os.PathLike, *, step: int | None = None, base_model: str | None = None,
              dtype: str | None = None, overwrite: bool = False) -> str:
    """Export LoRA adapters alone as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
    ``convert.peft``), which ``peft.PeftModel.from_pretrained`` loads over the HF export of the base model.

    Args:
      lora_model: an unmerged LoRA model (``mj.apply_lora``, ``loading.load_lora_adapters``), or a LoRA training
        workdir or one of its ``checkpoints/<step>`` dirs (local or on a bucket), whose adapters are then read
        alone: the base model is never loaded.
      out_dir: the directory to create (absent or empty unless ``overwrite``), local or ``gs://`` / ``s3://``;
        never a directory the adapters or their base are read from.
      step: for a workdir, the checkpoint step (default: the newest that restores).
      base_model: ``base_model_name_or_path`` in ``adapter_config.json`` (e.g. the base's HF export or hub id);
        default: a run's ``init_from`` as given, else None.
      dtype: the tensors' dtype (``"float32"`` when None, ``"bfloat16"``, ``"float16"``).
      overwrite: replace a previous PEFT export at ``out_dir`` (anything else is never replaced).

    Returns:
      ``out_dir``.

    Raises:
      ValueError: no adapters (a plain or merged model, not a LoRA workdir), adapters of different ranks or
        scales, a target PEFT cannot hold (``convert.peft.check_targets``), a checkpoint that does not restore.
      convert.paths.OutputPathError / OutputExistsError: as for :func:`save_hf`.
    """
    from flax import nnx

    from mistral_jax import lora as lora_lib
    from mistral_jax.convert import peft

    if dtype is not None:
        dtypes.np_dtype(dtype)  # validate before reading anything
    if isinstance(lora_model, (str, os.PathLike)):
        lora_model, init_from, inputs = _run_adapters(os.fspath(lora_model), step)
        base_model = base_model if base_model is not None else init_from
    else:
        inputs = sources_of(lora_model)
    if lora_lib.is_multi_lora(lora_model):
        raise ValueError("the model serves several adapters (stack_adapters). Fix: export each adapter's own LoRA "
                         "model (loading.load_lora_adapters(workdir)).")
    found = {tuple(map(str, path)): node for path, node in nnx.iter_graph(lora_model)
             if isinstance(node, lora_lib.LoRAWeight)}
    if not found:
        raise ValueError("the model has no LoRA adapters (a plain or merged model). Fix: pass the model before "
                         "merge_lora, loading.load_lora_adapters(workdir), or the LoRA run's workdir.")
    kinds = sorted({(int(w.a.shape[-1]), float(w.scale)) for w in found.values()})
    if len(kinds) > 1:
        raise ValueError(f"the adapters have different (rank, scale) pairs {kinds}; one PEFT config holds one. Fix: "
                         "export a model whose adapters share one rank and alpha (apply_lora gives them all one).")
    rank, scale = kinds[0]
    cfg = _cfg_of(lora_model)
    peft.check_targets(cfg, tuple(p[-1] for p in found))  # before the output is touched
    with paths.atomic_dir(out_dir, overwrite, peft.KIND, inputs=inputs) as tmp:
        peft.write(tmp, cfg, {p: (w.a[...], w.b[...]) for p, w in found.items()}, rank=rank,
                   alpha=scale * rank, base_model=None if base_model is None else os.fspath(base_model),
                   dtype=dtype)
    return os.fspath(out_dir)


def _run_adapters(path: str, step: int | None) -> tuple[Any, str | None, list[str]]:
    """``(LoRA model, init_from, input dirs)`` of a LoRA workdir (or step dir): the adapters of ``step`` restored
    over an abstract base (shapes only, nothing read or allocated for it)."""
    from flax import nnx

    from mistral_jax import lora as lora_lib
    from mistral_jax.model.transformer import Transformer
    from mistral_jax.training.checkpoint import restore_checkpoint_params

    run = lora_run(path) if files.is_dir(path) else None
    if run is None:
        raise ValueError(f"{path!r} is not a LoRA training workdir (a run_config.json with lora.rank > 0 and "
                         "checkpoints). Fix: pass the workdir of a run trained with config.lora.rank > 0.")
    root, config, found_step = run
    cfg = native.read_config(root).for_platform()
    spec = config["lora"]
    model = nnx.eval_shape(lambda: lora_lib.apply_lora(Transformer(cfg, rngs=nnx.Rngs(0)), int(spec["rank"]),
                                                       float(spec["alpha"]), spec.get("targets", "all")))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # adapters are small: one device holds them
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            nnx.to_pure_dict(lora_lib.adapter_state(model)))
    try:
        with native.quiet_orbax():
            adapters, _ = restore_checkpoint_params(storage.join(root, native.CHECKPOINTS), abstract,
                                                    found_step if step is None else step)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{root!r} is a LoRA training workdir whose adapters could not be restored: {e}. Fix: point "
                         "at a step that holds them (checkpoints/<step>).") from e
    state = lora_lib.adapter_state(model)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(model, state)
    init_from = config.get("init_from") or None
    return model, None if init_from is None else os.fspath(init_from), input_dirs(path, "jax")


def convert(src: str, dst: str, input_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
            dtype: str | None = None, max_shard_size: int | str = "5GB", overwrite: bool = False,
            mesh: jax.sharding.Mesh | None = None, rules: sharding.ShardingRules | None = None) -> str:
    """Convert a checkpoint directory between formats ``hf``, ``mistral`` and ``jax``.

    Args:
      src: format of ``input_dir`` (checked against its files).
      dst: format to write.
      input_dir: the checkpoint to read (local or ``gs://`` / ``s3://``).
      output_dir: the directory to create, atomically (absent or empty unless ``overwrite``; local or on a bucket,
        see the module docstring); never the input, inside it or a parent of it.
      dtype: output dtype; None keeps the stored one.
      max_shard_size: HF shard size (bytes, or ``"5GB"``).
      overwrite: replace a previous ``dst`` export at ``output_dir`` (never a training run or anything else).
      mesh: for ``jax`` sources / destinations, place parameters sharded on this mesh.
      rules: sharding rules for ``mesh``.

    Returns:
      ``output_dir``.
    """

    for name, value in (("src", src), ("dst", dst)):
        if value not in FORMATS:
            raise ValueError(f"{name}={value!r} is not a format. Fix: use one of {FORMATS}.")
    storage.check_supported(input_dir, "input_dir")
    storage.check_supported(output_dir, "output_dir")
    if dtype is not None:
        dtypes.np_dtype(dtype)  # validate before reading anything
    if dst == "hf":
        writing.parse_size(max_shard_size)
    storage.check_bucket(input_dir, "input_dir")
    storage.check_bucket(output_dir, "output_dir")
    if not files.is_dir(input_dir):
        raise FileNotFoundError(f"input directory {os.fspath(input_dir)!r} does not exist. Fix: check the path.")
    paths.check_complete(input_dir, "input_dir")  # an unfinished export is refused as that, not as "no known format"
    try:  # opened once: its format, config file and tokenizer are read here, not again by each step below
        ckpt = open_checkpoint(input_dir)
    except (ValueError, OSError):  # not readable as any format: open_source names what is wrong
        ckpt = None
    source_dir = ckpt if ckpt is not None and ckpt.format == src else input_dir
    guard = {"inputs": input_dirs(source_dir, src)}
    paths.check_output(output_dir, dst, overwrite, **guard)  # before reading: a refused output costs nothing
    source = open_source(source_dir, src, dtype=dtype if src == "jax" else None, mesh=mesh, rules=rules)  # type: ignore[arg-type]
    tok = tokenizer_path(source_dir, src)
    if tok:
        tokenizer_files.tokenizer_kind(tok)  # a tokenizer.model that is not one (e.g. a symlink to any file) fails here
    with paths.atomic_dir(output_dir, overwrite, dst, **guard) as tmp:
        if dst == "hf":
            hf.write(tmp, source, dtype=dtype, tokenizer=tok, max_shard_size=max_shard_size)
        elif dst == "mistral":
            mistral.write(tmp, source, dtype=dtype, tokenizer=tok)
        else:
            if isinstance(source, sources.ParamsSource):
                cfg, params = source.cfg, source.params
            else:
                cfg, params = build.build_params(source.cfg, source, dtype, mesh, rules)
            native.write(tmp, cfg, params, tokenizer=tok)
    return os.fspath(output_dir)
