"""RL with verifiable rewards in one process: prompt data and the GRPO recipe's hooks (rollouts, rewards, advantages).

Each train step of a ``grpo`` run (``training.recipe.GRPO``):

1. the loader gives this process its prompts of the step (``PromptBatches``: prompt indices; ``batch_size / G``
   prompts per step, shuffled per epoch, the position saved with each checkpoint);
2. ``GRPOHooks.rollout`` samples ``G`` completions of each with the decoding core (``inference.generate``) from the
   live train state, the policy's weights themselves (LoRA: base + adapters, unmerged), at ``grpo.temperature`` /
   ``grpo.top_p`` with a seed of (``seed``, step, process): a resumed run samples the same completions; each
   sampled token's log-prob under the sampling policy (``log_softmax(logits / temperature)``) is kept as
   ``old_logps``;
3. the reward functions (``grpo.rewards``: ``(prompt, completion, example) -> float``, ``training.rewards``) score
   each completion; ``training.grpo.group_advantages`` turns the rewards of each prompt's ``G`` completions into
   advantages;
4. the train step minimises ``training.grpo.GRPOObjective`` on the ``[B, T]`` batch of completions; with
   ``grpo.num_iterations`` = mu > 1, mu optimizer steps train on each rollout (the loader gives each prompt batch mu
   times; the ratio to the sampling policy then moves from 1 and the clipping acts; a checkpoint in the middle of
   a group keeps its rollout in the checkpoint's meta, so a resumed run trains on the same completions).

Metrics (TRL's names where TRL has them): ``reward``, ``reward_std``, ``rewards/<function>/mean`` / ``std``,
``frac_reward_zero_std``, ``completions/mean_length`` / ``min_length`` / ``max_length`` / ``clipped_ratio`` (no
``</s>`` within ``max_completion_length``), the loss's ``kl``, ``entropy``, ``clip_ratio/*``, and the time split:
``rollout/seconds``, ``rollout/tokens_per_sec`` (completion tokens sampled per second), ``train/seconds``,
``train/tokens_per_sec`` (prompt + completion tokens trained per second); goodput counts rollouts as ``rollout``.
Held-out: every ``eval_every`` steps the greedy answers to the first ``grpo.eval_prompts`` validation prompts,
scored by the same functions (``eval/reward``, ``eval/rewards/<function>/mean``).

A reward function that raises (or returns a non-number) mid-run stops the run (``hooks.StopRun``): the last finished
step is checkpointed, and the message names the function and the example.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mistral_jax.config import ConfigError
from mistral_jax.data import arithmetic
from mistral_jax.data import chat as chat_lib
from mistral_jax.data.epochs import EpochBatches
from mistral_jax.training import grpo as grpo_lib
from mistral_jax.training import rewards as rewards_lib
from mistral_jax.training.hooks import Hooks, LoopContext, StopRun

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class PromptSet:
    """A split's records, their prompt texts and rendered prompt ids."""

    records: list[dict[str, Any]]
    texts: list[str]
    prompts: list[list[int]]


_SETS: dict[tuple, PromptSet] = {}


def split_name(data_cfg: Any, split: str) -> tuple[str, str]:
    """``(source, hub split)`` of ``split`` ("train" / "validation")."""
    if split == "train":
        return data_cfg.train, data_cfg.get("train_split", "train") or "train"
    return data_cfg.validation, data_cfg.get("validation_split", "test") or "test"


def render_prompt(text: str, tok: Any, as_chat: bool) -> list[int]:
    """The ids of a prompt: a user turn in the tokenizer's chat format (``as_chat``) or ``<s>`` + the text."""
    if as_chat:
        return chat_lib.render_prompt([{"role": "user", "content": text}], tok)
    return tok.encode(text, bos=True, eos=False)


def prompt_set(cfg: Any, tok: Any, split: str) -> PromptSet:
    """The prompts of ``split`` of a run config (``data.train`` / ``data.validation``: ``"bundled"`` = the generated
    arithmetic problems, ``.jsonl`` files, or a hub dataset in GSM8K's layout), read once per process."""
    d, g = cfg.data, cfg.grpo
    source, hub_split = split_name(d, split)
    key = (source, hub_split, d.get("hub_config", ""), g.prompt_field, bool(g.chat), tok.path)
    if key not in _SETS:
        records = list(arithmetic.load_records(source, hub_split if source != "bundled" else split,
                                               d.get("hub_config", "")))
        if not records:
            raise ConfigError(f"config.data.{'train' if split == 'train' else 'validation'}={source!r} has no "
                              "records. Fix: point it at a non-empty .jsonl file, 'bundled' or a hub dataset.")
        texts = []
        for i, r in enumerate(records):
            text = r.get(g.prompt_field) if isinstance(r, Mapping) else None
            if not isinstance(text, str) or not text:
                raise ConfigError(f"{split} example {i} of {source!r} has no text field {g.prompt_field!r} (its "
                                  f"fields: {sorted(r) if isinstance(r, Mapping) else type(r).__name__}). Fix: set "
                                  "--config.grpo.prompt_field to the field holding the prompt.")
            texts.append(text)
        _SETS[key] = PromptSet(records, texts, [render_prompt(t, tok, bool(g.chat)) for t in texts])
    return _SETS[key]


class PromptBatches(EpochBatches):
    """This process's prompts of each step: ``{"prompt_index": int32 [n]}`` (``n`` = prompts per step / processes),
    every epoch a fresh permutation (``shuffle``); a last partial batch is dropped (a step has all its prompts).
    ``repeat``: each batch is given that many times in a row (``grpo.num_iterations`` steps on one rollout)."""

    def __init__(self, n_prompts: int, prompts_per_step: int, *, seed: int, shuffle: bool, loop: bool,
                 process_index: int = 0, process_count: int = 1, repeat: int = 1):
        if prompts_per_step > n_prompts:
            raise ConfigError(f"a step takes {prompts_per_step} prompts (config.batch_size / grpo.num_generations) "
                              f"but the data has {n_prompts}. Fix: lower config.batch_size or add prompts.")
        self.n, self.batch_size, self.seed, self.shuffle, self.loop = n_prompts, prompts_per_step, seed, shuffle, loop
        self.process_index, self.process_count, self.repeat = process_index, process_count, max(1, int(repeat))
        self.epoch = self.batch_in_epoch = 0
        self._epoch_batches = None

    def _build_epoch(self) -> list[dict[str, np.ndarray]]:
        order = self._order(self.n)
        full = len(order) - len(order) % self.batch_size
        sl = slice(self.process_index, None, self.process_count)
        return [{"prompt_index": order[i:i + self.batch_size][sl].astype(np.int32)}
                for i in range(0, full, self.batch_size) for _ in range(self.repeat)]


@dataclasses.dataclass(frozen=True)
class PromptData:
    """Prompts with reference answers (``data.format = "prompts"``): the data of RL recipes. Its batches are prompt
    indices; the recipe's rollout hook turns them into completions."""

    cfg: Any
    name = "prompts"
    trains_tokenizer = False

    def local_rows(self, source: Any, bsharding: Any, batch_size: int) -> int:
        del source, bsharding
        return batch_size // jax.process_count()

    def open(self, split: str) -> str | None:
        return split if split == "train" or self.cfg.data.validation else None

    def batches(self, source: str, tok: Any, batch_size: int, *, train: bool, bsharding: Any) -> PromptBatches:
        del bsharding
        g = int(self.cfg.grpo.num_generations)
        return PromptBatches(len(prompt_set(self.cfg, tok, source).prompts), batch_size // g,
                             seed=int(self.cfg.seed), shuffle=bool(self.cfg.data.shuffle) and train, loop=train,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             repeat=int(self.cfg.grpo.get("num_iterations", 1) or 1) if train else 1)

    def empty_batch(self, rows: int) -> dict[str, np.ndarray]:
        return {"prompt_index": np.zeros((0,), np.int32)}


# ---------------------------------------------------------------------------------------------- the batch
def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     logps: Sequence[Sequence[float]], seq_len: int) -> dict[str, np.ndarray]:
    """The ``[N, seq_len]`` train rows of ``N`` (prompt, completion) pairs (``training.grpo``'s layout): the
    sequence prompt + completion shifted by one into tokens / targets, ``weights`` 1 on completion targets,
    ``old_logps`` the sampled tokens' log-probs there, right-padded (``segment_ids`` 0)."""
    n = len(prompts)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    out["weights"] = np.zeros((n, seq_len), np.float32)
    out["old_logps"] = np.zeros((n, seq_len), np.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, logps, strict=True)):
        seq = list(p) + list(c)
        t = len(seq) - 1
        if t > seq_len:
            raise ValueError(f"prompt {len(p)} + completion {len(c)} tokens exceed data.seq_len + 1 = {seq_len + 1}")
        out["tokens"][i, :t], out["targets"][i, :t] = seq[:-1], seq[1:]
        out["positions"][i, :t], out["segment_ids"][i, :t] = np.arange(t), 1
        out["weights"][i, len(p) - 1:t] = 1.0
        out["old_logps"][i, len(p) - 1:t] = lp
    return out


def rollout_chunk(model_cfg: Any, rows: int) -> int:
    """The prefill chunk of a rollout over ``rows`` rows: the window (``decode.default_chunk_size``) cut so one call
    feeds at most ``decode.PREFILL_TOKENS`` tokens (the server's bound: a chunk's attention temporaries grow with
    rows x chunk x the window), a power of two >= 16."""
    from mistral_jax.inference import decode

    limit = max(16, 1 << max(0, (decode.PREFILL_TOKENS // max(rows, 1)).bit_length() - 1))
    return min(decode.default_chunk_size(model_cfg), limit)


def batch_ways(mesh: Any, rules: Any) -> int:
    """How many shards the rows of a batch take on ``mesh`` under ``rules`` (the product of its batch axes)."""
    import math

    from mistral_jax import sharding

    spec = sharding.batch_sharding(mesh, rules).spec
    axes = spec[0] if spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(int(mesh.shape[a]) for a in axes)


def step_seed(seed: int, step: int, process: int = 0) -> int:
    """The sampling seed of train step ``step + 1`` on ``process`` (the same in a resumed run)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(step), int(process)]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------------------------------- the hooks
class GRPOHooks(Hooks):
    """The GRPO recipe's loop hooks: rollouts and rewards before each step, their metrics after it, the held-out
    reward at each eval. See the module docstring."""

    def __init__(self, cfg: Any, objective: grpo_lib.GRPOObjective):
        self.cfg, self.objective, self.config = cfg, objective, objective.config
        self.rewards = rewards_lib.resolve(cfg.grpo.rewards)
        self.weights = reward_weights(cfg.grpo, len(self.rewards))
        self.g = int(cfg.grpo.num_generations)
        self.ctx: LoopContext | None = None
        self.stats: dict[str, float] = {}
        self._t_train = 0.0
        self._ref = None
        self.iterations = max(1, int(cfg.grpo.get("num_iterations", 1) or 1))
        self._group: tuple[dict[str, np.ndarray], dict[str, float]] | None = None  # (batch, stats) of the rollout

    def setup(self, context: LoopContext) -> None:
        self.ctx = context
        if jax.process_count() > 1:
            raise ConfigError("config.recipe='grpo' samples its rollouts in one process for now (a mesh of this "
                              f"process's devices), but {jax.process_count()} processes run. Fix: run one process.")

    def _model(self, state: dict[str, Any]) -> Any:
        return self.objective.model(self.ctx.graphdef, state["params"], state["frozen"])

    def _generate(self, model: Any, prompts: list[list[int]], *, seed: int, greedy: bool = False
                  ) -> tuple[list[list[int]], list[list[float]]]:
        from mistral_jax.inference.generate import generate  # the decoding core

        c = self.config
        top_p = float(self.cfg.grpo.top_p)
        lora = self.objective.reference == "adapters_off" or bool(self.cfg.lora.rank)
        run = self.ctx.run
        ways = batch_ways(run.mesh, run.rules)
        mesh = run.mesh if ways > 1 and len(prompts) % ways == 0 else None  # rows and cache over the batch axes
        return generate(model, prompts, max_new_tokens=c.max_completion_length, mesh=mesh, rules=run.rules,
                        chunk_size=rollout_chunk(model.cfg, len(prompts)),
                        temperature=0.0 if greedy else c.temperature, top_p=None if greedy or top_p >= 1 else top_p,
                        seed=seed, eos_id=self.ctx.tokenizer.eos_id, logprobs=True if greedy else c.temperature,
                        unstack=False if lora else None)

    def _score(self, rows: list[tuple[int, list[int]]], pset: PromptSet) -> tuple[np.ndarray, list[str]]:
        """``[N, F]`` rewards of (prompt index, completion ids) rows; a failing function stops the run."""
        tok, eos = self.ctx.tokenizer, self.ctx.tokenizer.eos_id
        out = np.zeros((len(rows), len(self.rewards)), np.float64)
        texts = []
        for n, (i, ids) in enumerate(rows):
            text = tok.decode([x for x in ids if x != eos])
            texts.append(text)
            try:
                out[n] = rewards_lib.score(self.rewards, pset.texts[i], text, pset.records[i], i)
            except rewards_lib.RewardError as e:
                raise StopRun(str(e)) from e
        return out, texts

    def rollout(self, step: int, state: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """A new rollout every ``num_iterations`` steps (the first of each group), else the group's rollout again
        (its ``old_logps`` stay the sampling policy's: the ratio moves from 1 as the policy is updated)."""
        if step % self.iterations and self._group is not None:
            self.stats = {**self._group[1], "rollout/seconds": 0.0, "rollout/reused": 1.0}
            self._tokens = float(np.sum(self._group[0]["segment_ids"] > 0))
            return dict(self._group[0])
        out = self._rollout(step - step % self.iterations, state, batch)
        self._group = (out, dict(self.stats))
        return dict(out)

    def _rollout(self, step: int, state: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        ctx, c, g = self.ctx, self.config, self.g
        pset = prompt_set(self.cfg, ctx.tokenizer, "train")
        index = [int(i) for i in batch["prompt_index"] for _ in range(g)]
        prompts = [pset.prompts[i] for i in index]
        t0 = time.perf_counter()
        ids, lps = self._generate(self._model(state), prompts,
                                  seed=step_seed(self.cfg.seed, step, jax.process_index()))
        t_gen = time.perf_counter() - t0
        rewards, _ = self._score(list(zip(index, ids, strict=True)), pset)
        out = completion_batch(prompts, ids, lps, int(self.cfg.data.seq_len))
        kl = None
        if c.kl_in_reward and self.objective.needs_reference:  # RLOO: beta x the summed old - ref log-ratio
            ref = np.asarray(jax.device_get(self._reference_logps(state, out)))
            kl = np.sum((out["old_logps"] - ref) * out["weights"], axis=-1)
        out["advantages"], stats = grpo_lib.group_advantages(rewards, g, c, self.weights, kl)
        lengths = np.array([len(x) for x in ids])
        eos = ctx.tokenizer.eos_id
        for k, (name, _) in enumerate(self.rewards):
            stats[f"rewards/{name}/mean"] = float(np.nanmean(rewards[:, k]))
            stats[f"rewards/{name}/std"] = float(grpo_lib._nanstd(rewards[:, k]))
        stats.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                      "completions/max_length": float(lengths.max()),
                      "completions/clipped_ratio": float(np.mean([x[-1] != eos for x in ids])),
                      "rollout/seconds": time.perf_counter() - t0,
                      "rollout/tokens_per_sec": float(lengths.sum()) / max(t_gen, 1e-9)})
        self.stats = stats
        self._tokens = float(np.sum(out["segment_ids"] > 0))
        return out

    def checkpoint_extras(self, step: int) -> dict[str, Any]:
        """Mid-group (``num_iterations`` > 1, ``step`` not a multiple of it): the group's rollout, so a resumed run
        trains on the same completions (``restore_extras``)."""
        if self.iterations == 1 or step % self.iterations == 0 or self._group is None:
            return {}
        import base64
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **self._group[0])
        return {"rollout": base64.b64encode(buf.getvalue()).decode("ascii"), "rollout_stats": self._group[1]}

    def restore_extras(self, extras: dict[str, Any]) -> None:
        if "rollout" in extras:
            import base64
            import io

            with np.load(io.BytesIO(base64.b64decode(extras["rollout"]))) as z:
                self._group = ({k: z[k] for k in z.files}, dict(extras.get("rollout_stats") or {}))

    def _reference_logps(self, state: dict[str, Any], batch: dict[str, np.ndarray]) -> Any:
        if self._ref is None:
            import functools

            self._ref = jax.jit(functools.partial(self.objective.reference_logps, self.ctx.graphdef))
        return self._ref(state["params"], state["frozen"], batch)

    def before_step(self, step: int, state: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        self._t_train = time.perf_counter()
        return state

    def after_step(self, step: int, state: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
        jax.block_until_ready(metrics["loss"])
        dt = time.perf_counter() - self._t_train
        return {**metrics, **self.stats, "train/seconds": dt, "train/tokens_per_sec": self._tokens / max(dt, 1e-9)}

    def held_out(self, step: int, state: dict[str, Any]) -> dict[str, float] | None:
        """Greedy answers to the first ``grpo.eval_prompts`` validation prompts, scored by the reward functions."""
        if not self.cfg.data.validation:
            return {}
        pset = prompt_set(self.cfg, self.ctx.tokenizer, "validation")
        try:
            n = min(int(self.cfg.grpo.eval_prompts), len(pset.prompts))
            ways = batch_ways(self.ctx.run.mesh, self.ctx.run.rules)
            return greedy_rewards(self._model(state), self.ctx.tokenizer, pset, self.rewards, self.weights, n=n,
                                  max_new_tokens=self.config.max_completion_length,
                                  unstack=False if self.cfg.lora.rank else None,
                                  mesh=self.ctx.run.mesh if ways > 1 and n % ways == 0 else None,
                                  rules=self.ctx.run.rules)
        except rewards_lib.RewardError as e:
            raise StopRun(str(e)) from e


def greedy_rewards(model: Any, tok: Any, pset: PromptSet, rewards: list[tuple[str, Any]], weights: np.ndarray, *,
                   n: int, max_new_tokens: int, unstack: bool | None = None, mesh: Any = None,
                   rules: Any = None) -> dict[str, float]:
    """The mean reward per function (``rewards/<name>/mean``) and weighted (``reward``) of ``model``'s greedy
    answers to the first ``n`` prompts of ``pset`` (the held-out measure of a GRPO run; ``benchmarks/grpo.py``
    measures any checkpoint with it)."""
    from mistral_jax.inference.generate import generate  # the decoding core

    n = min(int(n), len(pset.prompts))
    ids = generate(model, pset.prompts[:n], max_new_tokens=max_new_tokens, temperature=0.0, eos_id=tok.eos_id,
                   chunk_size=rollout_chunk(model.cfg, n), unstack=unstack, mesh=mesh,
                   **({"rules": rules} if rules is not None else {}))
    scores = np.array([rewards_lib.score(rewards, pset.texts[i], tok.decode([x for x in ids[i] if x != tok.eos_id]),
                                         pset.records[i], i) for i in range(n)])
    out = {f"rewards/{name}/mean": float(np.mean(scores[:, k])) for k, (name, _) in enumerate(rewards)}
    out["reward"] = float(np.mean(scores @ weights))
    out["prompts"] = float(n)
    return out


# --------------------------------------------------------------------------------------------- the config
def reward_weights(block: Any, n: int) -> np.ndarray:
    """``grpo.reward_weights`` (comma-separated, "" = all 1) as ``[n]`` floats."""
    spec = str(block.get("reward_weights", "") or "").strip()
    if not spec:
        return np.ones(n)
    try:
        w = np.array([float(x) for x in spec.split(",")])
    except ValueError:
        raise ConfigError(f"config.grpo.reward_weights={spec!r} is not a comma-separated list of numbers. Fix: e.g. "
                          f"'{','.join(['1.0'] * n)}'.") from None
    if len(w) != n:
        raise ConfigError(f"config.grpo.reward_weights={spec!r} has {len(w)} weights for {n} reward functions "
                          f"(config.grpo.rewards). Fix: give one weight per function, or '' for all 1.")
    return w


def check_prompts(cfg: Any, tok: Any, rewards: list[tuple[str, Any]]) -> None:
    """Before training: every prompt fits the rollout budget (prompt + ``max_completion_length`` <= ``data.seq_len``
    + 1), and each reward function scores the first example's reference answer as a number."""
    budget = int(cfg.data.seq_len) + 1 - int(cfg.grpo.max_completion_length)
    for split in ("train", "validation"):
        if split == "validation" and not cfg.data.validation:
            continue
        pset = prompt_set(cfg, tok, split)
        for i, p in enumerate(pset.prompts):
            if len(p) > budget:
                raise ConfigError(
                    f"{split} prompt {i} is {len(p)} tokens, more than the rollout budget data.seq_len + 1 - "
                    f"grpo.max_completion_length = {cfg.data.seq_len} + 1 - {cfg.grpo.max_completion_length} = "
                    f"{budget}. Fix: raise --config.data.seq_len to at least "
                    f"{len(p) + int(cfg.grpo.max_completion_length) - 1}, or drop the long prompts.")
    pset = prompt_set(cfg, tok, "train")
    example = pset.records[0]
    answer = example.get("answer", "") if isinstance(example, Mapping) else ""
    try:
        rewards_lib.score(rewards, pset.texts[0], str(answer), example, 0)
    except rewards_lib.RewardError as e:
        raise ConfigError(f"config.grpo.rewards: on train example 0 (its reference answer as the completion): {e}"
                          ) from None


# ------------------------------------------------------------------------------------------------------ AOT
def rollout_programs(run: Any, graphdef: Any, state: dict[str, Any], objective: grpo_lib.GRPOObjective
                     ) -> dict[str, tuple[Any, int, dict[str, int]]]:
    """The rollout's programs for the AOT tool, on ``state``'s abstract arrays (their train shardings): the decode
    loop (``DECODE_BLOCK`` steps) and one prefill chunk (``rollout_chunk``) over all ``batch_size`` rows, with a rolling
    cache of ``cache_length(data.seq_len)`` slots sharded as the training mesh shards rows and kv heads.

    Returns ``{name: (lower, resident, parts)}``: ``lower()`` gives the lowered program, ``resident`` the bytes per
    chip the train state keeps outside the program's arguments (the optimizer state; the reference copy), ``parts``
    the named bytes per chip (``kv_cache``, ``optimizer``, ``reference``)."""
    import math

    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mistral_jax.inference import decode
    from mistral_jax.model.kv_cache import KVCache

    cfg, mesh, rules = run.model_cfg, run.mesh, run.rules
    b, c = run.data.batch_size, objective.config
    slots = decode.cache_length(cfg, run.data.seq_len)
    abstract = jax.eval_shape(lambda: KVCache.init(cfg, b, slots))
    cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                         abstract.shardings(mesh, rules))
    frozen = state["frozen"]["model"] if objective.keeps_initial else state["frozen"]

    def per_chip(tree: Any) -> int:
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    parts = {"kv_cache": per_chip((cache.k, cache.v)), "optimizer": per_chip(state["opt_state"]),
             "reference": per_chip(state["frozen"]["initial"]) if objective.keeps_initial else 0}
    resident = parts["optimizer"] + parts["reference"]
    rows = NamedSharding(mesh, rules.spec(("batch",), mesh))
    grid = NamedSharding(mesh, rules.spec(("batch", None), mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    chunk = rollout_chunk(cfg, b)

    def model_state(params: Any, frozen: Any) -> tuple[Any, Any]:
        return nnx.split(objective.model(graphdef, params, {"model": frozen} if objective.keeps_initial else frozen))

    def decode_loop(params, frozen, cache, tokens, positions, done, key, start, n):
        g, s = model_state(params, frozen)
        return decode.decode_loop(g, s, cache, tokens, positions, done, key, start, n, block=decode.DECODE_BLOCK,
                                  temperature=c.temperature, logprobs=c.temperature)

    def prefill_chunk(params, frozen, cache, tokens, positions):
        g, s = model_state(params, frozen)
        return decode.forward_chunk(g, s, cache, tokens, positions, last_only=True)

    def arr(shape: tuple[int, ...], dtype: Any, sh: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    key = jax.eval_shape(lambda: jax.random.key(0))
    programs = {
        "rollout decode": lambda: jax.jit(decode_loop, donate_argnums=(2,)).lower(
            state["params"], frozen, cache, arr((b,), jnp.int32, rows), arr((b,), jnp.int32, rows),
            arr((b,), jnp.bool_, rows), jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
            arr((), jnp.int32, replicated), arr((), jnp.int32, replicated)),
        "rollout prefill": lambda: jax.jit(prefill_chunk, donate_argnums=(2,)).lower(
            state["params"], frozen, cache, arr((b, chunk), jnp.int32, grid), arr((b, chunk), jnp.int32, grid)),
    }
    return {name: (lower, resident, parts) for name, lower in programs.items()}
