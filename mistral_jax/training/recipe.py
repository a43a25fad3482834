"""Training recipes: what a run trains, from which weights, on which data. Chosen once from the run config.

A recipe is a ``Recipe`` subclass registered by name in ``RECIPES`` (``@register_recipe("name")``), the one place
that knows recipes; ``config.recipe`` picks one ("" = the recipe registered as the default of ``data.format``).
Built in: ``pretrain`` (text), ``sft`` (chat) and ``preference`` (DPO / ORPO); LoRA adapters (``lora.rank``) are an
option of every recipe. A new recipe is one new module (a subclass, registered; a config file imports it) plus a
config: the trainer, the step, the run resolution, the checkpoints and the config schema need no edit, because a
recipe declares what they ask of it:

* ``config_defaults()``: its own config block ``config.<name>`` (``configs/base.py`` adds every registered
  recipe's block, so the schema accepts it and ``--config.<name>.field=...`` works);
* ``state_fields``: the fields of that block that shape the train state or its meaning (a resumed run should keep
  them; ``state_fields()``, the union over the registry, is what the trainer names when it refuses a resume);
* ``make_objective``: the ``training.step.Objective`` the train step minimises (batch layout, loss, ``prepare``,
  eval sums); ``describe``: one line for the logs;
* ``hooks()``: a ``training.hooks.Hooks`` the loop calls (rollout, before / after step, eval, checkpoint extras).

A ``Recipe`` is three choices read from the run config by ``choose(cfg)``:

* data (``data.format``, ``DATA_KINDS``): ``TextData`` (pretraining on documents, packed), ``ChatData``
  (conversations in Mistral's chat format, loss on the assistant answers only; ``data/chat.py``) or
  ``PreferenceData`` (chosen / rejected pairs, ``data/preference.py``);
* start (``init_from``): a fresh seeded init, or a checkpoint (HF, Mistral consolidated or mistral_jax dir)
  whose architecture replaces the run's (in the ``ModelConfig`` that ``run.resolve`` builds) and whose weights are
  read slice by slice onto the training mesh;
* adapters (``lora.rank``): none (every weight trains) or ``LoRA`` adapters wrapped around the target weights.

The recipe fixes the training objective (``objective``): the token loss of ``training.loss`` for text and chat;
for preference data the ``config.preference`` objective of ``training.preference`` (DPO against a frozen
reference, or ORPO). DPO's reference is ``init_from`` (required): with adapters, the model with its adapters zeroed
(no second copy); without, a frozen copy of the initial weights in the train state's ``frozen`` part
(``Objective.keeps_initial``), rebuilt from ``init_from`` on resume.

It gives the trainer everything that differs between runs (the model config is the ``RunSpec``'s): the tokenizer
(``tokenizer``), the data (``open_data``, ``batches``, ``empty_batch``, ``local_rows``), the objective, the hooks,
the model to train (``abstract_model`` / ``init_model``) and the ``trainable`` ``nnx`` filter that splits it into
the train state's ``params`` and ``frozen`` parts (``training.step.state_layout``). ``nnx.Param`` is that filter
for every recipe: ``lora.apply_lora`` turns the base weights into ``lora.Frozen`` variables, so only the adapters
remain ``nnx.Param``. Frozen weights are not checkpointed: a resumed run rebuilds them with ``init_model``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any, ClassVar

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from mistral_jax import loading, sharding, storage
from mistral_jax import lora as lora_lib
from mistral_jax.config import ConfigError, ModelConfig
from mistral_jax.data import chat, pipeline, prepared
from mistral_jax.data import loader as data_loader
from mistral_jax.data import preference as preference_data
from mistral_jax.data import tokenizer as tokenizer_lib
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.data.train_tokenizer import VocabularyTooSmall, train_tokenizer
from mistral_jax.model.transformer import Transformer
from mistral_jax.training import grpo as grpo_lib
from mistral_jax.training import preference as preference_lib
from mistral_jax.training import rewards as rewards_lib
from mistral_jax.training import rl
from mistral_jax.training import step as step_lib
from mistral_jax.training.hooks import Hooks

log = logging.getLogger(__name__)

# run config fields that shape the train state or its meaning, for every recipe: a resumed run must keep them
# (``state_fields()`` adds each registered recipe's own)
STATE_FIELDS = ("model.", "optimizer.", "lora.", "init_from", "remat", "data.tokenizer", "data.format", "recipe")


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def addressable_rows(bsharding: NamedSharding, batch_size: int) -> list[int]:
    """The global batch rows that this process's devices hold under ``bsharding`` (and so the rows it reads).

    Any row order the sharding gives (not only contiguous blocks per process): ``data.loader.GrainBatches`` reads
    exactly these rows.
    """
    rows = NamedSharding(bsharding.mesh, PartitionSpec(*tuple(bsharding.spec)[:1]))  # the row dimension's sharding
    index = rows.addressable_devices_indices_map((batch_size,))
    return sorted({r for sl in index.values() for r in range(*sl[0].indices(batch_size))})


# ----------------------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class TextData:
    """Documents (``data.train`` / ``data.validation``: local files or a hub dataset) packed into rows."""

    cfg: Any  # the run config
    name = "text"
    trains_tokenizer = True  # a new run without a tokenizer trains one on these documents

    def local_rows(self, source: Any, bsharding: NamedSharding, batch_size: int) -> int:
        """How many rows of a ``batch_size``-row global batch this process reads from ``source`` (a hub stream)."""
        del source, bsharding
        return batch_size // jax.process_count()

    def open(self, split: str) -> Any:
        """The source of ``split`` ("train" / "validation"): files (local or in a bucket) as ``RawFiles``, read
        through their prepared copy in the cache (``loader.cached_prepare``); a hub dataset as a stream; None when
        the config has no such data."""
        d = self.cfg.data
        spec = d.train if split == "train" else d.validation
        if split != "train" and not spec:
            return None
        if pipeline.is_files(spec):
            return RawFiles(spec, split)
        return pipeline.open_source(spec, split=d.train_split if split == "train" else d.validation_split,
                                    hub_config=d.hub_config, text_field=d.text_field,
                                    on_decode_error=d.on_decode_error, shuffle_buffer=d.shuffle_buffer)

    def batches(self, source: Any, tok: Tokenizer, batch_size: int, *, train: bool, bsharding: NamedSharding):
        """This process's share of every ``batch_size``-row global batch of a streamed hub dataset."""
        c, d = self.cfg, self.cfg.data
        return pipeline.PackedBatches(
            source, tok, d.seq_len, batch_size // jax.process_count(), seed=c.seed, shuffle=d.shuffle and train,
            add_bos=d.add_bos, add_eos=d.add_eos, loop=train, process_index=jax.process_index(),
            process_count=jax.process_count())

    def empty_batch(self, rows: int) -> dict[str, Any]:
        """``rows`` rows that carry no loss (the end of a held-out split)."""
        return pipeline.empty_batch(rows, self.cfg.data.seq_len)


@dataclasses.dataclass(frozen=True)
class ChatData:
    """Conversations (``data.format = "chat"``) rendered with the tokenizer's chat format, answer-only loss."""

    cfg: Any
    name = "chat"
    trains_tokenizer = False  # the model's chat tokenizer is needed

    def local_rows(self, source: Any, bsharding: NamedSharding, batch_size: int) -> int:
        del source, bsharding
        return batch_size // jax.process_count()

    def open(self, split: str) -> str | None:
        """``split`` itself (``chat.chat_batches`` reads the conversations), None without validation data."""
        return split if split == "train" or self.cfg.data.validation else None

    def batches(self, source: str, tok: Tokenizer, batch_size: int, *, train: bool, bsharding: NamedSharding):
        """Packed chat batches (this process's rows of a ``batch_size``-row global batch)."""
        del bsharding  # conversations are dealt to processes by index
        return chat.chat_batches(self.cfg.data, tok, batch_size, split=source, seed=int(self.cfg.seed), loop=train,
                                 process_index=jax.process_index(), process_count=jax.process_count())

    def empty_batch(self, rows: int) -> dict[str, Any]:
        return pipeline.empty_batch(rows, self.cfg.data.seq_len)


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    """Chosen / rejected pairs (``data.format = "preference"``) rendered with the tokenizer's chat format into
    ``[B, 2, T]`` pair batches (``data/preference.py``): local files, ``"bundled"`` or a streamed hub dataset."""

    cfg: Any
    name = "preference"
    trains_tokenizer = False

    def local_rows(self, source: Any, bsharding: NamedSharding, batch_size: int) -> int:
        del source, bsharding
        return batch_size // jax.process_count()

    def open(self, split: str) -> str | None:
        """``split`` itself (``preference_batches`` reads the records), None without validation data."""
        return split if split == "train" or self.cfg.data.validation else None

    def batches(self, source: str, tok: Tokenizer, batch_size: int, *, train: bool, bsharding: NamedSharding):
        """Pair batches (this process's rows of a ``batch_size``-row global batch)."""
        del bsharding  # pairs are dealt to processes by row
        return preference_data.preference_batches(self.cfg.data, tok, batch_size, split=source,
                                                  seed=int(self.cfg.seed), loop=train,
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count())

    def empty_batch(self, rows: int) -> dict[str, Any]:
        pairs = int(self.cfg.data.get("pairs_per_row", 1) or 1)
        return preference_data.stack_rows([preference_data.empty_row(self.cfg.data.seq_len, pairs)] * rows)


@dataclasses.dataclass(frozen=True)
class RawFiles:
    """Raw files of ``split`` (``data.train`` / ``data.validation``: file, dir, glob; local or in a bucket): read
    through their prepared copy in this machine's cache, made on first use (``data.loader.cached_prepare``)."""

    spec: str
    split: str


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Prepared datasets (``data/prepared.py``) of any data kind: ``[(name, RowSource, weight)]``, read with
    ``data.loader.GrainBatches`` (each process its own rows; the position resumes in constant time)."""

    components: list

    def check_tokenizer(self, tok: Tokenizer) -> None:
        """Each dataset was tokenized with ``tok`` (the sha256 of its file), else ``PreparedError``."""
        for name, src, _ in self.components:
            prepared.check_tokenizer(src.path, src.manifest, tok, f"data {name!r}")


# the data kinds of ``data.format``; a recipe with a new kind of data adds it here from its own module
DATA_KINDS: dict[str, type] = {"text": TextData, "chat": ChatData, "preference": PreferenceData,
                               "prompts": rl.PromptData}


# ------------------------------------------------------------------------------------------------- adapters
@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters on ``targets`` (``lora.py``); the base weights become frozen."""

    rank: int
    alpha: float
    targets: str
    seed: int
    quantize_base: str = ""  # QLoRA: "int8" / "int4" stores the frozen base weights so (quant.py) before the adapters

    def wrap(self, model: nnx.Module) -> nnx.Module:
        if self.quantize_base:
            from mistral_jax import quant

            quant.quantize_weights(model, self.quantize_base)
        return lora_lib.apply_lora(model, self.rank, self.alpha, self.targets, seed=self.seed)

    def __str__(self) -> str:
        base = f" over an {self.quantize_base} base (QLoRA)" if self.quantize_base else ""
        return f"LoRA rank {self.rank} on {','.join(lora_lib.resolve_targets(self.targets))}{base}"


# --------------------------------------------------------------------------------------------------- recipe
@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a run trains and on what; see the module docstring. Build it with ``choose(cfg)``.

    A subclass registered with ``@register_recipe(name)`` is a recipe ``config.recipe`` can name. The class
    attributes and class methods below are what it may override; the defaults are the token loss on the data of
    ``data.format``, no config block and no hooks.

    Attributes (class level):
      kind: the registered name (set by ``register_recipe``).
      default_for: the ``data.format`` whose runs use this recipe when ``config.recipe`` is "" (None: only by name).
      state_fields: dotted fields of the recipe's own config block that a resumed run should keep (its objective's
        identity), e.g. ``("preference.objective",)``: a refused resume names their changes.
    """

    cfg: Any  # the run config
    data: Any  # one of DATA_KINDS (TextData, ChatData, PreferenceData or a recipe's own)
    init_from: str | None  # checkpoint directory; "" = fresh init; None = required but not given
    adapters: LoRA | None
    trainable: Any = nnx.Param  # nnx filter of the trained variables (the rest is the state's "frozen")
    objective: step_lib.Objective = step_lib.TOKEN_LOSS  # what the train step minimises (and eval measures)

    kind: ClassVar[str] = ""
    default_for: ClassVar[str | None] = None
    state_fields: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------------------ what a recipe declares
    @classmethod
    def config_defaults(cls) -> ConfigDict | None:
        """The recipe's own config block ``config.<kind>`` with its defaults (one comment per field), or None."""
        return None

    @classmethod
    def make_objective(cls, cfg: Any, init_from: str | None, adapters: LoRA | None) -> step_lib.Objective:
        """The objective of a run config (raise ``ConfigError`` naming the field for a bad block)."""
        del cfg, init_from, adapters
        return step_lib.TOKEN_LOSS

    @classmethod
    def from_config(cls, cfg: Any, init_from: str | None, adapters: LoRA | None) -> Recipe:
        """The recipe of a run config (reads nothing but the config); ``choose`` calls it."""
        fmt = _get(cfg, "data.format", "text")
        if fmt not in DATA_KINDS:
            raise ConfigError(f"config.data.format={fmt!r} is unknown. Fix: use one of {sorted(DATA_KINDS)}.")
        return cls(cfg=cfg, data=DATA_KINDS[fmt](cfg), init_from=init_from, adapters=adapters,
                   objective=cls.make_objective(cfg, init_from, adapters))

    def describe(self) -> str:
        """What the run does, a few words for the logs (the start and adapters are added by ``name``)."""
        return f"{self.kind} on {self.data.name} data"

    def hooks(self) -> Hooks:
        """The loop's hooks of one run (``training.hooks.Hooks``); a fresh object per ``train`` call."""
        return Hooks()

    def check_data(self) -> None:
        """Checks of the recipe's data that need no device (``train.py`` runs them before anything loads; the
        tokenizer file may be read): raise ``ConfigError``. Default: none."""

    def aot_programs(self, run: Any, graphdef: Any, state: dict[str, Any]) -> dict[str, tuple[Any, int, dict]]:
        """Programs the run executes besides the train step, with the train state resident (an RL recipe's
        rollouts), for the AOT tool: ``{name: (lower, resident bytes per chip outside its arguments, named parts)}``
        on the abstract ``state``. Default: none."""
        del run, graphdef, state
        return {}

    # ------------------------------------------------------------------------------------------- name
    @property
    def name(self) -> str:
        start = (f"from {self.init_from}" if self.init_from else "from a fresh init" if self.init_from == ""
                 else "from config.init_from (not set)")
        return f"{self.describe()} {start}" + (f", {self.adapters}" if self.adapters else ", every weight trains")

    @property
    def trains_tokenizer(self) -> bool:
        """Whether a new run trains its own tokenizer on ``data.train`` (no tokenizer given or inherited)."""
        return (not self.cfg.data.tokenizer and not self.init_from and self.data.trains_tokenizer
                and self.prepared_tokenizer() is None)

    def prepared_tokenizer(self) -> str | None:
        """The tokenizer file kept in the (first) prepared training dataset, if the data is prepared."""
        d = self.cfg.data
        first = d.get("train", "")
        if d.get("mixture", ""):
            first = data_loader.parse_mixture(d.mixture, d.get("datasets", ""))[0][1]
        if not first or not prepared.is_prepared(first):
            return None
        found = Tokenizer.find(first)
        return found.path if found is not None else None

    # ------------------------------------------------------------------------------------------ model
    def abstract_model(self, model_cfg: ModelConfig) -> nnx.Module:
        """The model to train as abstract arrays (``nnx.eval_shape``): nothing read or allocated."""
        return nnx.eval_shape(lambda: self._wrap(Transformer(model_cfg, rngs=nnx.Rngs(0))))

    def init_model(self, model_cfg: ModelConfig, mesh: Mesh, rules: sharding.ShardingRules) -> nnx.Module:
        """The model at step 0, every array in its shard: ``init_from`` read onto ``mesh`` (never whole on one
        host) or a fresh init with ``config.seed``; wrapped with the adapters, if any."""
        if self.init_from:
            overrides = {k: v for k, v in model_cfg.runtime().items() if k != "param_dtype"}
            overrides["max_seq_len"] = model_cfg.max_seq_len
            model = loading.load_pretrained(self.init_from, dtype=model_cfg.param_dtype, mesh=mesh, rules=rules,
                                            config_overrides=overrides)
            if model.cfg != model_cfg:
                raise ConfigError(f"config.init_from={self.init_from!r} loads as {model.cfg} but the run expects "
                                  f"{model_cfg}. Fix: do not override architecture fields of config.model with "
                                  "init_from.")
        else:
            model = step_lib.fresh_model(model_cfg, int(self.cfg.seed), mesh, rules)
        return self._wrap(model)

    def _wrap(self, model: nnx.Module) -> nnx.Module:
        return self.adapters.wrap(model) if self.adapters else model

    # -------------------------------------------------------------------------------------- tokenizer
    def tokenizer_source(self) -> str | None:
        """The sentencepiece file this config reads (``data.tokenizer`` or ``init_from``'s), or None (the run's
        own, trained or kept in the workdir)."""
        if self.cfg.data.tokenizer:
            try:  # a named tokenizer (mistral:v1) compares as its file
                return tokenizer_lib.resolve(self.cfg.data.tokenizer)
            except ValueError:
                return self.cfg.data.tokenizer
        if self.init_from:
            try:
                return loading.tokenizer_path(self.init_from, loading.detect_format(self.init_from))
            except (OSError, ValueError):
                return None
        return self.prepared_tokenizer()

    def tokenizer(self, workdir: str, model_cfg: ModelConfig) -> Tokenizer:
        """``data.tokenizer``, else ``init_from``'s ``tokenizer.model``, else the workdir's (a resumed run), else one
        trained on ``data.train``; copied into ``workdir`` as the run's ``tokenizer.model`` (process 0)."""
        dest = storage.join(workdir, Tokenizer.FILENAME)
        path = self.cfg.data.tokenizer
        if not path and self.init_from:
            path = loading.tokenizer_path(self.init_from, loading.detect_format(self.init_from))
            if path is None:
                raise ConfigError(f"config.init_from={self.init_from!r} has no tokenizer.model. Fix: set "
                                  "--config.data.tokenizer=PATH to the checkpoint's sentencepiece model.")
        if not path:  # prepared data keeps the tokenizer it was tokenized with
            path = self.prepared_tokenizer()
        if path:
            tok = Tokenizer(path)
            if jax.process_index() == 0 and storage.absolute(tok.path) != storage.absolute(dest):
                storage.write_bytes(dest, tok.read_bytes())  # local or bucket, either side
            return tok
        if not self.data.trains_tokenizer:
            raise ConfigError(f"{self.data.name} fine-tuning needs the model's tokenizer. Fix: set "
                              "config.data.tokenizer or config.init_from (a checkpoint directory holding "
                              "tokenizer.model).")
        if storage.path(dest).is_file():  # a resumed run keeps the tokenizer it trained
            return Tokenizer(dest)
        return self._train_tokenizer(dest, model_cfg)

    def _train_tokenizer(self, dest: str, model_cfg: ModelConfig) -> Tokenizer:
        d = self.cfg.data
        if jax.process_count() > 1:
            raise ConfigError("config.data.tokenizer='' (train one) is single-process only. Fix: train it first "
                              "(mistral-jax-train-tokenizer) and set data.tokenizer.")
        vocab = d.tokenizer_vocab_size
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1 or vocab > model_cfg.vocab_size:
            raise ConfigError(f"config.data.tokenizer_vocab_size={vocab!r} must be an integer in [1, config.model."
                              f"vocab_size={model_cfg.vocab_size}] (the model embeds every piece). Fix: set "
                              f"--config.data.tokenizer_vocab_size={model_cfg.vocab_size}, or raise "
                              "--config.model.vocab_size as well.")
        texts = pipeline.load_texts(d.train, d.text_field, d.on_decode_error)
        log.info("training a %d-piece sentencepiece tokenizer on %d documents of %s", vocab, len(texts), d.train)
        try:
            train_tokenizer(texts, dest, vocab)
        except VocabularyTooSmall as e:
            raise ConfigError(
                f"config.data.tokenizer_vocab_size={vocab}: {e} (config.data.train={d.train!r}). Fix: set "
                f"--config.data.tokenizer_vocab_size={e.needed} --config.model.vocab_size={e.needed} (or larger;"
                " model.vocab_size must be >= the tokenizer's), or pass a trained tokenizer with "
                "--config.data.tokenizer=PATH.") from None
        return Tokenizer(dest)

    # ------------------------------------------------------------------------------------------- data
    def open_data(self, split: str) -> Any:
        """The source of ``split`` ("train" / "validation") for ``batches``; None when there is none. Prepared data
        (a directory with a manifest, or ``data.mixture``) is a ``PreparedData`` of any data kind."""
        comps = data_loader.open_components(self.cfg.data, split, kind=self.data.name)
        if comps is not None:
            return PreparedData(comps)
        return self.data.open(split)

    def ready_data(self, source: Any, tok: Tokenizer) -> Any:
        """``source`` ready to read with ``tok``: raw files prepared (once per machine, ``loader.cached_prepare``),
        prepared data checked against the tokenizer. The loop calls it for the train and held-out data up front, so
        nothing is prepared in the middle of training."""
        if isinstance(source, RawFiles):
            path = data_loader.cached_prepare(source.spec, self.cfg.data, tok, self.data.name)
            return PreparedData([(source.split, prepared.open_dataset(path, tokenizer=tok), 1.0)])
        if isinstance(source, PreparedData):
            source.check_tokenizer(tok)
        return source

    def batches(self, source: Any, tok: Tokenizer, batch_size: int, *, train: bool, bsharding: NamedSharding):
        """This process's rows of every ``batch_size``-row global batch of ``source`` (an iterator of numpy
        batches with ``get_state`` / ``set_state``)."""
        source = self.ready_data(source, tok)
        if isinstance(source, PreparedData):
            d = self.cfg.data
            return data_loader.GrainBatches(source.components, batch_size, addressable_rows(bsharding, batch_size),
                                            seed=int(self.cfg.seed), shuffle=bool(d.shuffle) and train, loop=train,
                                            num_threads=int(d.get("read_threads", 4) or 1),
                                            prefetch=int(d.get("prefetch", 4) or 1),
                                            allow_mixture_change=bool(d.get("allow_mixture_change", False)))
        return self.data.batches(source, tok, batch_size, train=train, bsharding=bsharding)

    def empty_batch(self, rows: int) -> dict[str, Any]:
        """``rows`` rows of this data's batch layout that carry no loss (pads the end of a held-out split)."""
        return self.data.empty_batch(rows)

    def local_rows(self, source: Any, bsharding: NamedSharding, batch_size: int) -> int:
        """How many rows of a ``batch_size``-row global batch of ``source`` this process holds."""
        if isinstance(source, (PreparedData, RawFiles)):
            return len(addressable_rows(bsharding, batch_size))
        return self.data.local_rows(source, bsharding, batch_size)


# ------------------------------------------------------------------------------------------------- registry
RECIPES: dict[str, type[Recipe]] = {}  # every recipe a config can name: register_recipe fills it


def register_recipe(name: str) -> Callable[[type[Recipe]], type[Recipe]]:
    """Class decorator: register a ``Recipe`` subclass as ``config.recipe = name`` (its block: ``config.<name>``).

    Registering happens on import: a config using a recipe outside this module imports the recipe's module.
    """
    def register(cls: type[Recipe]) -> type[Recipe]:
        if not (isinstance(cls, type) and issubclass(cls, Recipe)):
            raise TypeError(f"register_recipe({name!r}) decorates a Recipe subclass, not {cls!r}.")
        old = RECIPES.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"recipe {name!r} is already registered by {old.__module__}.{old.__qualname__}. Fix: "
                             "give the new recipe another name.")
        defaults_of = {c.default_for: k for k, c in RECIPES.items() if c.default_for and k != name}
        if cls.default_for and cls.default_for in defaults_of:
            raise ValueError(f"recipe {name!r}: data.format={cls.default_for!r} already defaults to recipe "
                             f"{defaults_of[cls.default_for]!r}. Fix: set default_for = None (select it by name).")
        cls.kind = name
        RECIPES[name] = cls
        return cls

    return register


def recipe_class(cfg: Any) -> type[Recipe]:
    """The registered recipe a run config names (``config.recipe``, or the default of ``data.format``)."""
    name = _get(cfg, "recipe", "") or ""
    if name:
        if name not in RECIPES:
            raise ConfigError(f"config.recipe={name!r} is not a registered recipe. Fix: use one of "
                              f"{sorted(RECIPES)} (a recipe of another module registers when its module is "
                              "imported: import it in the config file).")
        return RECIPES[name]
    fmt = _get(cfg, "data.format", "text")
    for cls in RECIPES.values():
        if cls.default_for == fmt:
            return cls
    if fmt not in DATA_KINDS:
        raise ConfigError(f"config.data.format={fmt!r} is unknown. Fix: use one of {sorted(DATA_KINDS)}.")
    raise ConfigError(f"config.data.format={fmt!r} has no default recipe. Fix: use one of "
                      f"{sorted(c.default_for for c in RECIPES.values() if c.default_for)}, or name a recipe with "
                      f"--config.recipe (one of {sorted(RECIPES)}).")


def config_blocks() -> dict[str, ConfigDict]:
    """``{name: default block}`` of every registered recipe that has its own config block (``configs/base.py``
    adds them to the schema)."""
    out = {}
    for name, cls in RECIPES.items():
        block = cls.config_defaults()
        if block is not None:
            out[name] = block
    return out


def state_fields() -> tuple[str, ...]:
    """Config fields a resumed run must keep: ``STATE_FIELDS`` and every registered recipe's ``state_fields``."""
    return STATE_FIELDS + tuple(f for cls in RECIPES.values() for f in cls.state_fields)


def choose(cfg: Any) -> Recipe:
    """The recipe of a run config (reads nothing but the config)."""
    init_from = _get(cfg, "init_from", "")
    init_from = None if init_from is None else os.fspath(init_from)
    cls = recipe_class(cfg)
    rank = int(_get(cfg, "lora.rank", 0) or 0)
    adapters = None
    if rank:
        quantize_base = str(_get(cfg, "lora.quantize_base", "") or "")
        if quantize_base not in ("", "int8", "int4"):
            raise ConfigError(f"config.lora.quantize_base={quantize_base!r} is not a base quantization. Fix: use "
                              "'int8' or 'int4' (QLoRA: the frozen base in int8, or int4 in blocks of 64) or '' (the "
                              "base as loaded).")
        adapters = LoRA(rank=rank, alpha=float(cfg.lora.alpha), targets=cfg.lora.targets, seed=int(cfg.seed),
                        quantize_base=quantize_base)
        try:
            lora_lib.resolve_targets(adapters.targets)
        except ValueError as e:
            raise ConfigError(f"config.lora.targets={adapters.targets!r}: {e}") from None
        if rank < 0 or adapters.alpha <= 0:
            raise ConfigError(f"config.lora.rank={rank}, config.lora.alpha={adapters.alpha}: the rank must be >= 0 "
                              "(0 = no adapters) and alpha > 0. Fix: e.g. --config.lora.rank=16 "
                              "--config.lora.alpha=32.")
    return cls.from_config(cfg, init_from, adapters)


# --------------------------------------------------------------------------------------- built-in recipes
@register_recipe("pretrain")
class Pretrain(Recipe):
    """Next-token prediction on documents (``data.format = "text"``)."""

    default_for = "text"

    def describe(self) -> str:
        return "text pretraining"


@register_recipe("sft")
class SFT(Recipe):
    """Instruction fine-tuning on conversations (``data.format = "chat"``): the token loss on the answers."""

    default_for = "chat"

    def describe(self) -> str:
        return "chat fine-tuning"


@register_recipe("preference")
class Preference(Recipe):
    """Preference tuning on chosen / rejected pairs (``data.format = "preference"``): DPO or ORPO
    (``config.preference``, ``training.preference``)."""

    default_for = "preference"
    state_fields = ("preference.objective",)

    @classmethod
    def config_defaults(cls) -> ConfigDict:
        """``config.preference``: the objective (training/preference.py, TRL's DPOTrainer / ORPOTrainer math)."""
        b = ConfigDict()
        b.objective = "dpo"  # "dpo" (frozen reference = init_from; LoRA: adapters off) or "orpo" (none)
        b.loss_type = "sigmoid"  # DPO loss: sigmoid (DPO), ipo, robust (label-noise robust), hinge
        b.beta = 0.1  # DPO's beta (IPO's tau); ORPO's lambda (weight of the odds-ratio term)
        b.label_smoothing = 0.0  # loss_type="robust" only: probability a preference label is flipped
        b.orpo_nll_on_prompt = False  # ORPO: the NLL term also covers prompt tokens (TRL's ORPOTrainer)
        return b

    @classmethod
    def make_objective(cls, cfg: Any, init_from: str | None, adapters: LoRA | None) -> step_lib.Objective:
        """``config.preference`` as the step objective; DPO's reference is ``init_from`` (required)."""
        try:
            pc = preference_lib.PreferenceConfig.from_config(_get(cfg, "preference", None) or {})
        except ValueError as e:
            raise ConfigError(f"config.preference: {e}") from None
        if pc.needs_reference and init_from == "":
            raise ConfigError("config.preference.objective='dpo' trains against a frozen reference model, the "
                              "starting checkpoint, but config.init_from is '' (a fresh init). Fix: pass "
                              "--config.init_from=PATH (e.g. the instruction-tuned model: an HF, Mistral consolidated"
                              " or mistral_jax dir), or use --config.preference.objective=orpo (no reference).")
        pairs = int(_get(cfg, "data.pairs_per_row", 1) or 1)
        reference = "none" if not pc.needs_reference else "adapters_off" if adapters else "initial"
        return preference_lib.PreferenceObjective(config=pc, pairs_per_row=pairs, reference=reference)

    def describe(self) -> str:
        c = self.objective.config
        return (f"DPO preference tuning ({c.loss_type}, beta {c.beta:g})" if c.needs_reference
                else f"ORPO preference tuning (lambda {c.beta:g})")


@register_recipe("grpo")
class GRPO(Recipe):
    """RL with verifiable rewards on prompts (``data.format = "prompts"``): GRPO, Dr. GRPO, BNPO / DAPO or RLOO
    (``config.grpo``, ``training.grpo``), rollouts from the live weights by the decoding core (``training.rl``)."""

    default_for = "prompts"
    state_fields = ("grpo.loss_type", "grpo.num_generations", "grpo.num_iterations")

    @classmethod
    def config_defaults(cls) -> ConfigDict:
        """``config.grpo``: rollouts, rewards and the loss (TRL's GRPOTrainer / RLOOTrainer math)."""
        b = ConfigDict()
        b.loss_type = "grpo"  # grpo (sequence mean), dr_grpo (token sum / constant), bnpo / dapo (token mean), rloo
        b.num_generations = 8  # G completions per prompt (>= 2); config.batch_size = prompts per step x G
        b.max_completion_length = 64  # new tokens per completion at most (data.seq_len holds prompt + completion)
        b.num_iterations = 1  # optimizer steps per rollout (TRL's num_iterations, mu); num_steps counts optimizer steps
        b.temperature = 1.0  # sampling temperature (log-probs are those of logits / temperature)
        b.top_p = 1.0  # nucleus sampling of the rollouts (1 = off)
        b.beta = 0.0  # KL to the frozen reference (init_from; LoRA: adapters off); 0 = no reference
        b.epsilon_low = 0.2  # ratio clipped below at 1 - epsilon_low
        b.epsilon_high = 0.2  # ratio clipped above at 1 + epsilon_high (DAPO: 0.28)
        b.bias_correction_kl = True  # the KL term times each token's ratio (TRL's use_bias_correction_kl)
        b.scale_rewards = "group"  # GRPO family: advantages / the group's std ("group"), the batch's, or "none"
        b.normalize_advantages = False  # rloo: normalise advantages over the batch
        # reward functions (prompt, completion, example) -> float by import path, comma-separated
        b.rewards = "mistral_jax.training.rewards:exact_answer,mistral_jax.training.rewards:format_reward"
        b.reward_weights = ""  # comma-separated, one per reward function; "" = all 1
        b.prompt_field = "question"  # the record field holding the prompt (GSM8K: question)
        b.chat = True  # render each prompt as a user turn in the tokenizer's chat format ([INST] ... [/INST])
        b.eval_prompts = 64  # held-out prompts answered greedily at each eval (eval/reward)
        return b

    @classmethod
    def make_objective(cls, cfg: Any, init_from: str | None, adapters: LoRA | None) -> step_lib.Objective:
        block = _get(cfg, "grpo", None) or {}
        try:
            gc = grpo_lib.GRPOConfig.from_config(block)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.grpo: {e}") from None
        g = block.get("num_generations", 8)
        if not isinstance(g, int) or isinstance(g, bool) or g < 2:
            raise ConfigError(f"config.grpo.num_generations={g!r}: advantages compare the G completions of a prompt, "
                              "so G must be an integer >= 2. Fix: e.g. --config.grpo.num_generations=8.")
        mu = block.get("num_iterations", 1)
        if not isinstance(mu, int) or isinstance(mu, bool) or mu < 1:
            raise ConfigError(f"config.grpo.num_iterations={mu!r} must be an integer >= 1 (optimizer steps per "
                              "rollout). Fix: e.g. --config.grpo.num_iterations=1.")
        bs = _get(cfg, "batch_size", g)
        if isinstance(bs, int) and bs % g:
            raise ConfigError(f"config.batch_size={bs} is not a multiple of config.grpo.num_generations={g} (a batch "
                              f"is prompts x G completions). Fix: e.g. --config.batch_size={max(1, bs // g) * g}.")
        if gc.beta and init_from == "":
            raise ConfigError(f"config.grpo.beta={gc.beta} keeps the policy near a frozen reference, the starting "
                              "checkpoint, but config.init_from is '' (a fresh init). Fix: pass "
                              "--config.init_from=PATH, or --config.grpo.beta=0.")
        try:
            rewards_lib.resolve(block.get("rewards", ""))
        except ValueError as e:
            raise ConfigError(f"config.grpo.rewards: {e}") from None
        reference = "none" if not gc.beta else "adapters_off" if adapters else "initial"
        return grpo_lib.GRPOObjective(config=gc, reference=reference)

    def describe(self) -> str:
        c = self.objective.config
        return (f"{c.loss_type.upper()} on prompts ({self.cfg.grpo.num_generations} completions each, "
                f"beta {c.beta:g})")

    def hooks(self) -> Hooks:
        return rl.GRPOHooks(self.cfg, self.objective)

    def aot_programs(self, run: Any, graphdef: Any, state: dict[str, Any]) -> dict[str, tuple[Any, int, dict]]:
        """The rollout's decode loop and prefill chunk over ``batch_size`` rows (``rl.rollout_programs``)."""
        return rl.rollout_programs(run, graphdef, state, self.objective)

    def check_data(self) -> None:
        """Every prompt fits the rollout budget, each reward function scores a reference answer as a number."""
        source = self.tokenizer_source()
        if source is None:
            raise ConfigError("config.recipe='grpo' needs the model's tokenizer. Fix: set config.init_from (a "
                              "checkpoint with tokenizer.model) or config.data.tokenizer.")
        rewards = rewards_lib.resolve(self.cfg.grpo.rewards)
        rl.reward_weights(self.cfg.grpo, len(rewards))
        rl.check_prompts(self.cfg, Tokenizer(source), rewards)
