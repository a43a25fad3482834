"""GGUF, llama.cpp's format: one ``model.gguf`` (weights, hyper-parameters, tokenizer, chat template), written with
the ``gguf`` package (llama.cpp's own writer), tensor by tensor.

Architectures (``general.architecture``):

* ``llama`` (Mistral / Mixtral without a sliding window, or with one no shorter than the context): llama.cpp's
  Mistral and Mixtral, as its ``convert_hf_to_gguf.py`` writes them.
* ``granite_swa`` when the model has a sliding window W shorter than its context (``arch="auto"``): llama.cpp's
  ``llama`` architecture ignores ``llama.attention.sliding_window`` (every layer attends to the whole context),
  so past W tokens its logits would not be this model's. Of llama.cpp's architectures with a sliding window,
  ``granite_swa`` has Mistral's layer (RMSNorm, separate q / k / v, SwiGLU or a softmax top-k MoE, rotary pairs
  as ``llama``; the others add q / k norms, post-norms or gates) and a window set per layer: written with every
  layer windowed, ``logit_scale`` 1, no residual or embedding multipliers and attention sinks at -1e30 (which
  take no weight), it is exactly Mistral with window W (llama.cpp masks ``q - k >= W``, as
  ``model.attention.in_window``). ``arch="llama"`` forces the ``llama`` architecture (loaded by older llama.cpp
  builds too; exact only within W tokens).

Tensors (llama.cpp's names, numpy shapes ``[out, in]``, GGUF reverses them): ``token_embd``, ``blk.N.attn_norm``,
``attn_q`` / ``attn_k`` (rows in Mistral's interleaved rotary order, llama.cpp's ``LLAMA_ROPE_TYPE_NORM``: the
"reverse permute" of ``convert_hf_to_gguf.py``, i.e. the consolidated format's ``wq`` / ``wk``), ``attn_v``,
``attn_output``, ``ffn_norm``, ``ffn_gate`` / ``ffn_up`` / ``ffn_down`` or, for Mixtral, ``ffn_gate_inp`` (the
router) and the experts stacked ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` ``[E, out, in]``,
``output_norm``, ``output`` (absent for tied embeddings: llama.cpp reuses ``token_embd``).

Types: ``float32``, ``float16``, ``bfloat16`` or ``q8_0`` for the matrices (None keeps the stored dtype); as in
llama.cpp's converter, norms, other 1-D tensors and the router stay float32, and a matrix whose rows do not split
into q8_0's 32-value blocks is written float16.

Tokenizer: a sentencepiece model (Mistral v1 / v3, or one trained here) as llama.cpp's ``llama`` (SPM) tokenizer:
every piece with its score and type (normal, unknown, control, user-defined, byte); tekken as llama.cpp defines it
(``gpt2`` BPE, pre-tokenizer ``tekken``, the special tokens first; the token list and merges from gguf's own
``MistralVocab``). The chat template is the HF export's (``convert.hf.chat_template``) of the tokenizer's Mistral
instruct version, as ``tokenizer.chat_template``.

Streaming: the header (metadata and tensor infos) is written first, then each tensor's data as it is read and
converted: host memory is about one GGUF tensor (for Mixtral, one layer's stacked experts of one projection). A
bucket output is written to a local staging file (``storage.cache_dir("tmp")``; the writer needs a local file)
and uploaded, then removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mistral_jax import storage
from mistral_jax.config import ModelConfig
from mistral_jax.convert import keys as keys_lib
from mistral_jax.convert import paths, sources, tokenizer_files
from mistral_jax.convert import safetensors_io as st
from mistral_jax.convert.dtypes import dtype_name

KIND = "gguf"
FILENAME = "model.gguf"
DTYPES = ("float32", "bfloat16", "float16", "q8_0")
ARCHS = ("auto", "llama")  # auto: granite_swa for a window shorter than the context, else llama
NO_TOKENIZER = ("a GGUF file needs the model's tokenizer (llama.cpp loads none without a vocabulary), and none was "
                "found. Fix: put the tokenizer.model / tekken.json next to the checkpoint, or pass tokenizer=")
SINK = -1e30  # granite_swa's attention sinks: a logit no query score is below, so they take no weight

# model parameter path (convert.keys.Key.path) -> llama.cpp tensor name ({layer} filled in); experts share a name
_NAMES: dict[tuple[tuple[str, ...], str], str] = {
    (("embed",), "global"): "token_embd.weight",
    (("layers", "attention_norm", "weight"), "layer"): "blk.{layer}.attn_norm.weight",
    (("layers", "attention", "wq"), "layer"): "blk.{layer}.attn_q.weight",
    (("layers", "attention", "wk"), "layer"): "blk.{layer}.attn_k.weight",
    (("layers", "attention", "wv"), "layer"): "blk.{layer}.attn_v.weight",
    (("layers", "attention", "wo"), "layer"): "blk.{layer}.attn_output.weight",
    (("layers", "ffn_norm", "weight"), "layer"): "blk.{layer}.ffn_norm.weight",
    (("layers", "feed_forward", "w1"), "layer"): "blk.{layer}.ffn_gate.weight",
    (("layers", "feed_forward", "w2"), "layer"): "blk.{layer}.ffn_down.weight",
    (("layers", "feed_forward", "w3"), "layer"): "blk.{layer}.ffn_up.weight",
    (("layers", "feed_forward", "gate"), "layer"): "blk.{layer}.ffn_gate_inp.weight",
    (("layers", "feed_forward", "w1"), "expert"): "blk.{layer}.ffn_gate_exps.weight",
    (("layers", "feed_forward", "w2"), "expert"): "blk.{layer}.ffn_down_exps.weight",
    (("layers", "feed_forward", "w3"), "expert"): "blk.{layer}.ffn_up_exps.weight",
    (("norm", "weight"), "global"): "output_norm.weight",
    (("lm_head",), "global"): "output.weight",
}
_ALWAYS_F32 = ("_norm.weight", "ffn_gate_inp.weight")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a core dependency: only a broken install lacks it
        raise ImportError("the GGUF export needs the gguf package (llama.cpp's writer). Fix: pip install gguf") from e
    return gguf


def check_dtype(dtype: str | None) -> None:
    """Raise ``ValueError`` (one line with the fix) for a dtype the GGUF export cannot write."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a GGUF export type. Fix: use one of {DTYPES} (or None to keep the "
                         "stored dtype).")


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not a GGUF architecture of this export. Fix: use one of {ARCHS}.")


def architecture(cfg: ModelConfig, arch: str = "auto") -> str:
    """The ``general.architecture`` written for ``cfg``: ``llama``, or ``granite_swa`` for a sliding window shorter
    than the context (``auto``; see the module docstring)."""
    check_arch(arch)
    if arch != "auto":
        return arch
    windowed = cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len
    return "granite_swa" if windowed else "llama"


# ----------------------------------------------------------------------------------------------- tensor plan
@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    entries: tuple[keys_lib.Entry, ...]  # one, or a layer's experts in order (stacked on a leading axis)
    shape: tuple[int, ...]  # numpy shape of the file tensor (``[out, in]``, ``[E, out, in]``)
    qtype: Any  # gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        gguf = _gguf()
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def _qtype(name: str, shape: tuple[int, ...], stored: np.dtype, dtype: str | None):
    """llama.cpp converter's rule: 1-D tensors, norms and the router float32; the rest ``dtype`` (q8_0 where the
    rows split into 32-value blocks, else float16)."""
    q = _gguf().GGMLQuantizationType
    if len(shape) <= 1 or name.endswith(_ALWAYS_F32):
        return q.F32
    want = dtype or dtype_name(stored)
    if want == "q8_0":
        return q.Q8_0 if shape[-1] % 32 == 0 else q.F16
    return {"float32": q.F32, "float16": q.F16, "bfloat16": q.BF16}[want]


def plan(cfg: ModelConfig, source: sources.Source, dtype: str | None) -> list[_Tensor]:
    """Every tensor of the GGUF file of ``cfg``, in file order (experts of a layer grouped into one tensor)."""
    out: list[_Tensor] = []
    grouped: dict[str, list[keys_lib.Entry]] = {}
    for e in keys_lib.entries(cfg, "mistral"):
        name = _NAMES[(e.key.path, e.key.scope)].format(layer=e.layer)
        if e.key.scope == "expert":
            if name not in grouped:
                grouped[name] = []
                out.append(_Tensor(name, (), (), None))  # placeholder, filled below (keeps the order)
            grouped[name].append(e)
            continue
        shape = e.file_shape("mistral", cfg)
        out.append(_Tensor(name, (e,), shape, _qtype(name, shape, source.dtype(e), dtype)))
    for i, t in enumerate(out):
        if t.name in grouped:
            es = tuple(grouped[t.name])
            shape = (len(es), *es[0].file_shape("mistral", cfg))
            out[i] = _Tensor(t.name, es, shape, _qtype(t.name, shape, source.dtype(es[0]), dtype))
    return out


class _Unchanged:
    """A GGUF tensor whose bytes are its source's, in order (one tensor, or a layer's experts): copied file to file
    (``safetensors_io.copy_bytes``). ``GGUFWriter.write_tensor_data`` takes it as an array: it has ``nbytes`` and
    ``tofile``."""

    def __init__(self, spans: Sequence[st.FileBytes]):
        self.spans = tuple(spans)
        self.nbytes = sum(s.nbytes for s in self.spans)

    def tofile(self, out: Any) -> None:
        st.copy_bytes(out, self.spans)


def _unchanged(t: _Tensor, source: sources.Source) -> _Unchanged | None:
    """``t`` as stored in ``source``'s local files, when GGUF's bytes are exactly those (the Mistral layout's
    transform and the stored dtype: every matrix but the rotary-permuted ``wq`` / ``wk``, from HF or Mistral
    files), else None."""
    q = _gguf().GGMLQuantizationType
    dt = {q.F32: np.dtype(np.float32), q.F16: np.dtype(np.float16), q.BF16: np.dtype(ml_dtypes.bfloat16)}.get(t.qtype)
    if dt is None:
        return None
    spans = [sources.unchanged(source, e, "mistral", dt) for e in t.entries]
    return None if any(s is None for s in spans) else _Unchanged(spans)


def _encode(t: _Tensor, source: sources.Source, cfg: ModelConfig) -> np.ndarray | _Unchanged:
    """The bytes of one GGUF tensor (as the numpy array ``GGUFWriter.write_tensor_data`` takes), or, for a tensor
    stored as GGUF stores it, where they lie (:class:`_Unchanged`)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    same = _unchanged(t, source)
    if same is not None:
        return same
    if len(t.entries) == 1:
        data = np.asarray(t.entries[0].to_file("mistral", sources.transient(source, t.entries[0]), cfg))
    else:  # a layer's experts, stacked: [E, out, in]
        first = np.asarray(t.entries[0].to_file("mistral", sources.transient(source, t.entries[0]), cfg))
        data = np.empty(t.shape, first.dtype)
        data[0] = first
        del first
        for k, e in enumerate(t.entries[1:], start=1):
            data[k] = np.asarray(e.to_file("mistral", sources.transient(source, e), cfg))
    if t.qtype == q.BF16:
        return np.ascontiguousarray(data.astype(ml_dtypes.bfloat16, copy=False)).view(np.uint16)
    if t.qtype == q.F16:
        return np.ascontiguousarray(data.astype(np.float16, copy=False))
    data = np.ascontiguousarray(data.astype(np.float32, copy=False))
    if t.qtype == q.F32:
        return data
    return quantize_q8_0(data)  # gguf.quants.quantize's Q8_0 (llama.cpp's reference rounding), bit for bit


_Q8_BLOCKS = 1 << 16  # 32-value blocks per XLA call (8 MB of float32)


@functools.cache
def _q8_0_programs() -> tuple[Any, Any]:
    """The two compiled halves of :func:`quantize_q8_0`: each block's absmax, and its values scaled and rounded
    (llama.cpp's ``roundf``, half away from zero, written as ``gguf.quants.np_roundf`` writes it)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def rounded(blocks, inv):
        y = blocks * inv[:, None]
        a = jnp.abs(y)
        f = jnp.floor(a)
        return (jnp.sign(y) * (f + jnp.floor(2 * (a - f)))).astype(jnp.int8)

    return jax.jit(lambda blocks: jnp.max(jnp.abs(blocks), axis=1)), rounded


def quantize_q8_0(data: np.ndarray) -> np.ndarray:
    """``gguf.quants.quantize(data, Q8_0)`` bit for bit, about 2x faster: 32-value blocks, each stored as its
    float16 scale ``d = absmax / 127`` and the int8 values ``roundf(x / d)``.

    The elementwise work (absmax, scaling, rounding) runs in XLA over chunks of 65536 blocks (a power of two as
    small as the tensor allows, so a few programs serve every tensor); ``d`` and ``1 / d`` are computed in numpy,
    as gguf computes them: XLA's float32 division is not always correctly rounded (it moved 3 blocks in a million
    by one step). ``data``: float32, the last axis a multiple of 32; returns uint8 ``[..., last // 32 * 34]``.
    """
    blocks = np.ascontiguousarray(data, np.float32).reshape(-1, 32)
    n = blocks.shape[0]
    out = np.empty((n, 34), np.uint8)
    absmax, rounded = _q8_0_programs()
    size = min(_Q8_BLOCKS, 1 << max(n - 1, 1).bit_length())
    chunk = np.zeros((size, 32), np.float32)  # one aligned buffer, reused (the last chunk's tail stays zero: d = 0)
    for start in range(0, n, size):
        m = min(size, n - start)
        chunk[:m] = blocks[start:start + m]
        if m < size:
            chunk[m:] = 0
        d = np.asarray(absmax(chunk)) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        out[start:start + m, :2] = d[:m].astype(np.float16).view(np.uint8).reshape(m, 2)
        out[start:start + m, 2:] = np.asarray(rounded(chunk, inv))[:m].view(np.uint8)
    return out.reshape(*data.shape[:-1], data.shape[-1] // 32 * 34)


# ----------------------------------------------------------------------------------------------- metadata
def _file_type(tensors: Sequence[_Tensor]) -> int:
    """``general.file_type``: that of the matrices (``token_embd``, the first tensor, has their type)."""
    gguf = _gguf()
    ft, q = gguf.LlamaFileType, gguf.GGMLQuantizationType
    return int({q.F32: ft.ALL_F32, q.F16: ft.MOSTLY_F16, q.BF16: ft.MOSTLY_BF16,
                q.Q8_0: ft.MOSTLY_Q8_0}[tensors[0].qtype])


def _add_model_metadata(w: Any, cfg: ModelConfig, arch: str, name: str) -> None:
    w.add_name(name)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    if cfg.is_moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.sliding_window is not None:  # honoured by granite_swa; recorded (and ignored by llama.cpp) for llama
        w.add_sliding_window(int(cfg.sliding_window))
    if arch == "granite_swa":
        w.add_array(f"{arch}.attention.sliding_window_pattern", [True] * cfg.n_layers)  # every layer windowed
        w.add_logit_scale(1.0)  # llama.cpp divides the logits by it


def _add_sentencepiece(w: Any, tok: Any, vocab_size: int) -> None:
    """llama.cpp's ``llama`` (SPM) tokenizer from a sentencepiece model, as its converter writes it."""
    from sentencepiece import sentencepiece_model_pb2

    gguf = _gguf()
    tt = gguf.TokenType
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(tok.read_bytes())
    kinds = {1: tt.NORMAL, 2: tt.UNKNOWN, 3: tt.CONTROL, 4: tt.USER_DEFINED, 5: tt.UNUSED, 6: tt.BYTE}
    tokens = [p.piece.encode("utf-8") for p in m.pieces]
    scores = [float(p.score) for p in m.pieces]
    types = [int(kinds.get(p.type, tt.NORMAL)) for p in m.pieces]
    for i in range(len(tokens), vocab_size):  # a model vocabulary larger than the tokenizer's: unused ids
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(tt.UNUSED))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    sp = tok.sp
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if sp.pad_id() >= 0:
        w.add_pad_token_id(sp.pad_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(bool(m.normalizer_spec.add_dummy_prefix))
    w.add_remove_extra_whitespaces(bool(m.normalizer_spec.remove_extra_whitespaces))


def _add_tekken(w: Any, tok: Any, vocab_size: int) -> None:
    """llama.cpp's tekken: ``gpt2`` BPE with the ``tekken`` pre-tokenizer, through gguf's own ``MistralVocab``
    (the code of llama.cpp's converter), read from a directory holding only the ``tekken.json``."""
    gguf = _gguf()
    from gguf.vocab import MistralVocab


    with tempfile.TemporaryDirectory(dir=storage.cache_dir("tmp")) as d:
        with open(os.path.join(d, "tekken.json"), "wb") as f:
            f.write(tok.read_bytes())
        vocab = MistralVocab(Path(d))
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(float(score))
            types.append(int(kind))
        merges = vocab.extract_vocab_merges_from_model()
        bos, eos, unk, pad = vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id
    if len(tokens) > vocab_size:
        raise ValueError(f"the tekken tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}. "
                         "Fix: export with the tokenizer the model was trained with.")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(0.0)
        types.append(int(gguf.TokenType.UNUSED))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("tekken")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    w.add_pad_token_id(pad)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _add_tokenizer(w: Any, tokenizer: Any, cfg: ModelConfig) -> None:
    from mistral_jax.convert.hf import chat_template
    from mistral_jax.data.tokenizer import Tokenizer

    path = tokenizer_files.source_file(tokenizer)
    if path is None:
        raise ValueError(NO_TOKENIZER)
    tokenizer_files.tokenizer_kind(path)  # a checked tokenizer file (sentencepiece or tekken), one line if not
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer {path!r} has {tok.vocab_size} tokens but the model's vocabulary is "
                         f"{cfg.vocab_size}. Fix: export with the tokenizer the model was trained with.")
    if tok.kind == "tekken":
        _add_tekken(w, tok, cfg.vocab_size)
    else:
        _add_sentencepiece(w, tok, cfg.vocab_size)
    template = chat_template(tok.instruct_version)
    if template is not None:
        w.add_chat_template(template)


# ----------------------------------------------------------------------------------------------- writing
def write_file(path: str, source: sources.Source, *, dtype: str | None = None, tokenizer: Any = None,
               arch: str = "auto", name: str = "mistral_jax") -> None:
    """Write the GGUF file of ``source`` at the local ``path``: the header first, then each tensor as it is read.

    Args:
      path: a local file path (created).
      source: a checked tensor source (``convert.sources``: safetensors files or in-memory parameters).
      dtype: ``float32`` / ``float16`` / ``bfloat16`` / ``q8_0`` for the matrices; None keeps the stored dtype.
      tokenizer: a ``Tokenizer``, a ``tokenizer.model`` / ``tekken.json`` path (local or on a bucket), or a
        directory holding one (required: llama.cpp loads no GGUF without a vocabulary).
      arch: ``auto`` or ``llama`` (module docstring).
      name: ``general.name``.
    """
    check_dtype(dtype)
    gguf = _gguf()
    cfg = source.cfg
    arch_name = architecture(cfg, arch)
    tensors = plan(cfg, source, dtype)
    w = gguf.GGUFWriter(path, arch_name)
    try:
        _add_model_metadata(w, cfg, arch_name, name)
        w.add_file_type(_file_type(tensors))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tokenizer, cfg)
        sinks = [f"blk.{i}.attn_sinks.weight" for i in range(cfg.n_layers)] if arch_name == "granite_swa" else []
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        for s in sinks:
            w.add_tensor_info(s, (cfg.n_heads,), np.dtype(np.float32), 4 * cfg.n_heads,
                              raw_dtype=gguf.GGMLQuantizationType.F32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        end = w.fout[0].tell()
        for n in [t.nbytes for t in tensors] + [4 * cfg.n_heads] * len(sinks):
            end = w.ggml_pad(end, w.data_alignment) + n
        st.preallocate(w.fout[0], w.ggml_pad(end, w.data_alignment))
        for t in tensors:
            w.write_tensor_data(_encode(t, source, cfg))
        for _ in sinks:
            w.write_tensor_data(np.full((cfg.n_heads,), SINK, np.float32))
    finally:
        if w.fout is not None:
            w.close()


def write(out_dir: str, source: sources.Source, *, dtype: str | None = None, tokenizer: Any = None,
          arch: str = "auto", name: str = "mistral_jax") -> str:
    """Write ``model.gguf`` into the (temporary, or on a bucket the export's) directory ``out_dir``; returns its path.

    A bucket output is staged in a local file (``storage.cache_dir("tmp")``), uploaded, then removed.
    """
    check_dtype(dtype)
    check_arch(arch)
    target = storage.join(out_dir, FILENAME)
    if not storage.is_remote(target):
        write_file(target, source, dtype=dtype, tokenizer=tokenizer, arch=arch, name=name)
        return target
    fd, staged = tempfile.mkstemp(suffix=".gguf", dir=storage.cache_dir("tmp"))
    os.close(fd)
    try:
        write_file(staged, source, dtype=dtype, tokenizer=tokenizer, arch=arch, name=name)
        fs, key = storage.fs_and_key(target)
        fs.put_file(staged, key)
        with contextlib.suppress(Exception):
            fs.invalidate_cache(key)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staged)
    return target


def export(out_dir: str | os.PathLike, source: sources.Source, *, dtype: str | None = None, tokenizer: Any = None,
           arch: str = "auto", overwrite: bool = False, inputs: Sequence[str | os.PathLike] = (),
           name: str = "mistral_jax") -> str:
    """Write a GGUF export directory (``model.gguf``) atomically (``convert.paths.atomic_dir``: a temporary sibling
    renamed into place; on a bucket, between the export markers). ``inputs`` are the directories ``source`` reads
    (the output may not overlap them); ``overwrite`` replaces only a previous GGUF export. Returns ``out_dir``."""
    check_dtype(dtype)
    check_arch(arch)
    tok = tokenizer_files.source_file(tokenizer)
    if tok is None:
        raise ValueError(NO_TOKENIZER)  # before the output is touched
    tokenizer_files.tokenizer_kind(tok)
    with paths.atomic_dir(out_dir, overwrite, KIND, inputs=inputs, files=[tok]) as tmp:
        write(tmp, source, dtype=dtype, tokenizer=tokenizer, arch=arch, name=name)
    return os.fspath(out_dir)
