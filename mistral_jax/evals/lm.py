"""The lm-evaluation-harness model backend ``mistral_jax``: loglikelihood, rolling loglikelihood and generation.

Tokenisation and request handling follow lm-eval's ``hf`` backend (``lm_eval/models/huggingface.py``), so the
same checkpoint scores the same under ``--model hf`` and ``--model mistral_jax``:

* ``tok_encode`` prepends BOS (HF ``LlamaTokenizer``'s ``add_bos_token=True``) unless the text already starts
  with ``<s>``; ``<s>`` / ``</s>`` written in the text (chat templates) become the BOS / EOS ids.
* A (context, continuation) pair is encoded whole and split after the context's tokens (``TemplateLM``); the
  input is ``(context + continuation)[-(max_length + 1):][:-1]`` and the continuation's log-probs are summed
  in float32; ``is_greedy`` is the per-token argmax check.
* Rolling loglikelihood uses lm-eval's disjoint rolling windows of ``max_length`` with BOS as prefix.
* ``generate_until`` left-truncates prompts to ``max_length - max_gen_toks``, decodes greedily (or samples when
  ``do_sample``) with ``mistral_jax.generate`` over the KV cache, stops on EOS or a stop string, and cuts the
  text at the first stop string.

Shapes: requests are sorted by length (longest first), cut into batches of ``batch_size`` rows (padded with
dummy rows, so the batch is fixed) and each batch is right-padded to a power-of-two length bucket (>= 16,
capped at ``max_length``). The scoring step therefore compiles once per length bucket, at most
``log2(max_length / 16) + 2`` times, however many requests there are; every compilation is logged and
counted in ``compile_log``. With several devices the batch is sharded over a mesh (parameters FSDP-sharded
over the same devices when the model dim divides, else replicated).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mistral_jax import sharding, storage
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.inference.detokenize import decode_text
from mistral_jax.inference.prompt import encode_prompt
from mistral_jax.inference.sampling import is_greedy, token_logprobs

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # shortest padded length of a scoring batch
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_xla_compiles = [0]


def _count_backend_compiles(event: str, duration: float, **_: Any) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        _xla_compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_backend_compiles)


def xla_compile_count() -> int:
    """XLA backend compilations so far in this process (every jit / eager-op compile, from ``jax.monitoring``)."""
    return _xla_compiles[0]


def length_bucket(n: int, max_length: int, min_bucket: int = MIN_BUCKET) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: a power of two >= ``min_bucket``,
    capped at ``max_length``."""
    return min(max(1 << max(n - 1, 0).bit_length(), min_bucket), max_length)


def eval_mesh(cfg, devices: Sequence[Any] | None = None) -> tuple[jax.sharding.Mesh | None, sharding.ShardingRules]:
    """The evaluation mesh: None on one device; else every device shards the batch and, when ``cfg.dim``
    divides, the parameters too (FSDP); otherwise the parameters are replicated (pure data parallel)."""
    devices = list(jax.devices() if devices is None else devices)
    rules = sharding.rules_preset("fsdp")
    if len(devices) == 1:
        return None, rules
    if cfg.dim % len(devices) == 0:
        return sharding.make_mesh(fsdp=-1, devices=devices), rules
    return sharding.make_mesh(data=-1, fsdp=1, devices=devices), rules


def _score_batch(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, targets: jax.Array,
                 weights: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of ``log p(targets)`` over ``weights`` per row, and whether every weighted target is the argmax.

    tokens/targets/weights/valid: ``[B, T]``; ``valid`` marks real (non-padding) input tokens.
    """
    model = nnx.merge(graphdef, state)
    logits = model(tokens, segment_ids=valid.astype(jnp.int32))  # [B, T, V] float32
    target_logp = token_logprobs(logits, targets)  # [B, T] float32, as lm-eval's hf backend scores
    greedy = is_greedy(logits, targets)  # [B, T]
    total = jnp.sum(jnp.where(weights, target_logp, 0.0), axis=-1)  # [B]
    all_greedy = jnp.all(greedy | ~weights, axis=-1)  # [B]
    return total, all_greedy


@register_model("mistral_jax")
class MistralJaxLM(TemplateLM):
    """lm-eval backend over a ``mistral_jax.Transformer``.

    Args:
      checkpoint: a directory ``mistral_jax.load_pretrained`` accepts (HF, Mistral consolidated, mistral_jax);
        its ``tokenizer.model`` is used unless ``tokenizer`` is given. Alternatively pass ``model``.
        ``pretrained=`` (lm-eval's name, as in ``--model_args pretrained=DIR``) is accepted too.
      model: an in-memory ``Transformer`` (instead of ``checkpoint``).
      tokenizer: a ``Tokenizer``, a ``.model`` path or a directory holding ``tokenizer.model``.
      batch_size: rows per compiled batch (rounded up to a multiple of the device count); lm-eval's
        ``"auto"`` is read as the default 8.
      max_length: the context length (default ``cfg.max_seq_len``, as HF's ``max_position_embeddings``).
      max_gen_toks: default generation budget when a task does not set one (256, as the hf backend).
      dtype: parameter dtype when loading a checkpoint (``float32`` / ``bfloat16``); None keeps the stored one.
      quantize: ``int8``: the loaded checkpoint's projection weights in int8 (``quant.quantize_weights``).
      kv_cache_dtype: the decoding cache of generation tasks (``auto`` / ``int8``; ``ModelConfig.kv_cache_dtype``).
      add_bos_token: prepend BOS to every encoded text (Mistral: True).
      seed: sampling seed for ``do_sample`` generation tasks.
      devices: devices to shard over (default all); ``mesh`` overrides the automatic mesh.
      mesh: an explicit mesh (with ``rules``) to run on.
      rules: sharding rules for ``mesh``.
    """

    def __init__(self, checkpoint: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 batch_size: int | str | None = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str | None = None, add_bos_token: bool = True, seed: int = 0,
                 devices: Sequence[Any] | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.ShardingRules | None = None, quantize: str | None = None,
                 kv_cache_dtype: str | None = None, **unused: Any) -> None:
        super().__init__()
        if checkpoint is None and model is None:
            checkpoint = unused.pop("pretrained", None)  # lm-eval's usual name for the model directory
        unused = {k: v for k, v in unused.items() if k not in ("device", "max_batch_size")}
        if unused:
            raise TypeError(f"mistral_jax backend: unknown model_args {sorted(unused)}. Fix: use checkpoint=, "
                            "tokenizer=, batch_size=, max_length=, max_gen_toks=, dtype=, add_bos_token=, seed=, "
                            "quantize=, kv_cache_dtype=.")
        if (checkpoint is None) == (model is None):
            raise ValueError("mistral_jax backend needs exactly one of checkpoint=<dir> or model=<Transformer>; "
                             f"got checkpoint={checkpoint!r}, model={type(model).__name__ if model else None}.")
        rules = rules or sharding.rules_preset("fsdp")
        self.tokenizer = _resolve_tokenizer(tokenizer, checkpoint)  # a missing tokenizer fails before the load
        if model is None:
            from mistral_jax.loading import load_pretrained

            cfg0 = _peek_config(checkpoint)
            if mesh is None:
                mesh, rules = eval_mesh(cfg0, devices) if cfg0 is not None else (None, rules)
            overrides = {"kv_cache_dtype": kv_cache_dtype} if kv_cache_dtype else None
            model = load_pretrained(checkpoint, dtype=dtype, mesh=mesh, rules=rules, config_overrides=overrides)
            if quantize:
                from mistral_jax import quant

                quant.quantize_weights(model, quantize)
        elif mesh is None:
            mesh, rules = eval_mesh(model.cfg, devices)
        self.cfg = model.cfg
        self.mesh, self.rules = mesh, rules
        self.model = model
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} pieces but the model's vocab_size is "
                             f"{self.cfg.vocab_size}. Fix: pass the tokenizer the checkpoint was trained with.")
        n_dev = 1 if mesh is None else mesh.size
        bs = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._batch_size = -(-bs // n_dev) * n_dev  # a multiple of the device count (the batch is sharded)
        self._max_length = int(max_length or self.cfg.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token) if not isinstance(add_bos_token, str) else (
            add_bos_token.lower() == "true")
        self.seed = int(seed)
        self.checkpoint = checkpoint
        self.compile_log: list[tuple[str, tuple[int, ...]]] = []  # (function, shape) per compilation
        self._graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, sharding.state_shardings(state, mesh, self.rules))
            self._batch_sharding = sharding.batch_sharding(mesh, self.rules)
        self._state = state
        self._model_on_mesh = nnx.merge(self._graphdef, state)  # the model with its parameters on the mesh

        def traced(graphdef, state, tokens, targets, weights, valid):
            self.compile_log.append(("score", tuple(tokens.shape)))
            log.info("mistral_jax: compiling the scoring step for batch shape %s (compilation %d)",
                     tuple(tokens.shape), len(self.compile_log))
            return _score_batch(graphdef, state, tokens, targets, weights, valid)

        # outputs replicated: every process reads the scores (a batch-sharded output spans several hosts)
        out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._score = jax.jit(traced, static_argnums=0, out_shardings=out)  # one jit per backend (compile_log)

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        path = self.tokenizer.path  # a bucket URL keeps its scheme (abspath would make it a local path)
        return os.path.basename(os.path.dirname(path if storage.is_remote(path) else os.path.abspath(path))) + (
            "/tokenizer.model")

    @property
    def n_compilations(self) -> int:
        """Compilations of the scoring step by this backend so far."""
        return len(self.compile_log)

    # ------------------------------------------------------------------ tokenisation
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Ids of ``string``; BOS first when ``add_special_tokens`` (default: ``add_bos_token``) unless the text
        starts with ``<s>``. A string that starts with a chat this backend rendered (``apply_chat_template``) gets
        that chat's ids, mistral-common's, in which text typed by users never becomes a control token; text after
        it (lm-eval's continuation) is encoded together with the chat's last text run, as the HF export's tokenizer
        reads the whole string (v1: ``[/INST] answer`` is one run; v3 / tekken: the run after the ``[/INST]`` id).
        Otherwise literal ``<s>`` / ``</s>`` become BOS / EOS (few-shot
        prompts written as text); each text piece between them is encoded on its own."""
        chat = self._chat_prefix(string)
        if chat is not None:
            ids, tail_start, tail_text = self._chat_ids[chat]
            rest = string[len(chat):]
            if rest:  # as the HF export's tokenizer reads the whole string: the text after the last special token
                ids = ids[:tail_start] + self.tokenizer.encode(tail_text + rest, bos=False)  # is one run
            return ids[-left_truncate_len:] if left_truncate_len else list(ids)
        bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        ids = encode_prompt(self.tokenizer, string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _chat_prefix(self, string: str) -> str | None:
        """The longest rendered chat string that ``string`` starts with (None if none)."""
        chats = self.__dict__.setdefault("_chat_ids", {})
        if string in chats:
            return string
        best = None
        for n in sorted({len(k) for k in chats}, reverse=True):
            if n < len(string) and string[:n] in chats:
                best = string[:n]
                break
        return best

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``, decoded as HF's ``LlamaTokenizer`` does (the hf backend's reference): control and
        unknown ids are skipped (``skip_special_tokens``), ``▁`` becomes a space, a run of byte-fallback pieces
        is UTF-8 decoded as a whole or, if invalid, gives one U+FFFD per byte; one leading space is stripped.
        Ids the tokenizer does not have (a model vocab larger than the tokenizer's) are dropped."""
        # tekken (no sentencepiece model): mistral-common's decoding (special ids dropped)
        return decode_text(self.tokenizer, tokens, skip_unknown=skip_special_tokens)

    def decode(self, tokens: Sequence[int]) -> str:
        """``tok_decode`` under the name ``mistral_jax.generate`` uses for stop strings."""
        return self.tok_decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered in the tokenizer's Mistral instruct format by mistral-common (``data.chat``), as text
        (``<s>[INST] {system}\\n\\n{user} [/INST] {answer}</s>...`` for v1, ``<s>[INST]{user}[/INST]...`` for
        v3 / tekken). The ids are remembered with the text, so ``tok_encode`` of it (and of it followed by a
        continuation) gives mistral-common's ids: a literal ``<s>`` or ``[INST]`` typed in a message stays text.

        With ``add_generation_prompt=False`` and a final assistant message, that message is left open (no
        ``</s>``) so lm-eval can score its continuation.
        """
        from mistral_jax.data.chat import render_open

        ids = render_open([dict(m) for m in chat_history], self.tokenizer, add_generation_prompt)
        text = self.tokenizer.chat_text(ids)
        special = [i for i, t in enumerate(ids) if self.tokenizer.is_special(t)]
        tail_start = special[-1] + 1 if special else 0
        tail_text = self.tokenizer.chat_text(ids[tail_start:])
        self.__dict__.setdefault("_chat_ids", {})[text] = (ids, tail_start, tail_text)
        return text

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        version = getattr(self.tokenizer, "instruct_version", "v1")
        return f"mistral-common instruct {version} ({os.path.basename(self.tokenizer.path)})"

    # ------------------------------------------------------------------ scoring
    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        # every process holds the whole batch (lm-eval runs the same requests on each); each places its own shards
        return jax.make_array_from_callback(x.shape, self._batch_sharding, lambda index: x[index])

    def _run_score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Score ``rows`` = (input ids, n scored continuation tokens) for one batch of <= ``batch_size`` rows."""
        b = self.batch_size
        t = length_bucket(max(len(r[0]) for r in rows), self.max_length)
        tokens = np.zeros((b, t), np.int32)
        targets = np.zeros((b, t), np.int32)
        weights = np.zeros((b, t), bool)
        valid = np.zeros((b, t), bool)
        for i, (ids, n_cont) in enumerate(rows):
            inp, tgt = ids[:-1], ids[1:]
            tokens[i, :len(inp)], targets[i, :len(tgt)], valid[i, :len(inp)] = inp, tgt, True
            weights[i, len(inp) - n_cont:len(inp)] = True
        with sharding.use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext():
            total, greedy = self._score(self._graphdef, self._state, *map(self._put, (tokens, targets, weights,
                                                                                       valid)))
        total, greedy = jax.device_get((total, greedy))
        return [(float(total[i]), bool(greedy[i])) for i in range(len(rows))]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, greedy?) per (key, context ids, continuation ids) request."""
        rows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError(f"empty context ({len(ctx)} ids) or continuation ({len(cont)} ids) in a "
                                 "loglikelihood request. Fix: check the task's doc_to_text / doc_to_choice.")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}. "
                                 "Fix: raise max_length (model_args max_length=...) or shorten the targets.")
            whole = (ctx + cont)[-(self.max_length + 1):]  # [inputs..., last target], left-truncated like hf
            rows.append((whole, len(cont)))
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        with tqdm(total=len(rows), disable=disable_tqdm, desc="mistral_jax loglikelihood") as bar:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                for i, res in zip(idx, self._run_score([rows[i] for i in idx]), strict=True):
                    out[i] = res
                    key = requests[i][0]
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, res)
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over disjoint rolling windows of ``max_length`` (as the hf backend)."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores, strict=True):
            totals[r] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop string / EOS / ``max_gen_toks``, batched by generation settings."""
        from mistral_jax.inference.generate import generate

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.tokenizer.id_to_piece(self.eot_token_id)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="mistral_jax generate_until")
        for n_group, idx in enumerate(groups.values()):
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            if self.max_length - max_gen <= 0:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length="
                                 f"{self.max_length}. Fix: lower max_gen_toks or raise max_length.")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                       for i in idx}
            idx = sorted(idx, key=lambda i: -len(prompts[i]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                rows = [prompts[i] for i in chunk]
                rows += [rows[-1]] * (self.batch_size - len(rows))  # fixed batch: dummy rows reuse a prompt
                # The parameters are already placed on the mesh; the active mesh (use_mesh) shards the batch
                # through the model's logical constraints. generate(mesh=...) is not used: it re-jits its cache
                # initialiser on every call (one compilation per batch).
                with sharding.use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext():
                    new = generate(self._model_on_mesh, rows, max_new_tokens=max_gen, temperature=temperature,
                                   top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                                   seed=self.seed + 1000 * n_group + s, eos_id=self.eot_token_id,
                                   stop=[u for u in until if u], tokenizer=self)
                for i, ids in zip(chunk, new, strict=False):
                    if self.eot_token_id in ids:
                        ids = ids[:ids.index(self.eot_token_id)]
                    text = postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def get_model_info(self) -> dict[str, Any]:
        from mistral_jax.model.transformer import count_params

        return {"model_num_parameters": count_params(self.cfg), "model_dtype": self.cfg.param_dtype,
                "model_config": self.cfg.to_dict()}


def _peek_config(checkpoint: Any):
    """The ModelConfig of a checkpoint (a path, local or in a bucket, or an opened ``loading.Checkpoint``) from its
    config file only (None if it cannot be read cheaply)."""
    try:
        from mistral_jax.loading import open_checkpoint

        return open_checkpoint(checkpoint).config
    except Exception:  # noqa: BLE001 - load_pretrained below raises the real, detailed error
        return None


def _resolve_tokenizer(tokenizer: Any, checkpoint: str | None) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return Tokenizer(tokenizer)
    if checkpoint is not None:
        from mistral_jax.loading import detect_format, tokenizer_path

        path = tokenizer_path(checkpoint, detect_format(checkpoint))
        if path:
            return Tokenizer(path)
    raise ValueError(f"no tokenizer: checkpoint {checkpoint!r} holds no tokenizer.model and none was given. "
                     "Fix: pass tokenizer=<path to tokenizer.model> (eval.py --tokenizer).")
