"""Shared defaults of every pretraining run. Other configs start from ``base.get_config()`` and change fields.

Every field changes behaviour; unknown keys are rejected (``--config.optimzer.lr=...`` fails naming the key).
"""

import dataclasses

from ml_collections import ConfigDict, config_dict

from mistral_jax.config import ModelConfig
from mistral_jax.training import recipe

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def model_fields() -> ConfigDict:
    """``config.model``: a preset name plus every ModelConfig field as an override (None = the preset's value)."""
    m = ConfigDict()
    m.preset = "tiny"  # ModelConfig preset (tiny, tiny_mixtral, mistral_7b_v01, mistral_7b_v02, mixtral_8x7b) or ""
    for f in dataclasses.fields(ModelConfig):  # each ModelConfig field; None keeps the preset's value
        base = str(f.type).split("|")[0].strip()
        setattr(m, f.name, config_dict.placeholder(_TYPES.get(base, str)))
    return m


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0  # parameter init and data shuffling seed
    # what the run trains: a registered recipe (training/recipe.py RECIPES: pretrain, sft, preference, or one a
    # config file imports); "" = the default recipe of data.format (text: pretrain, chat: sft, preference: preference)
    c.recipe = ""
    c.num_steps = 1000  # optimizer steps in the run (also the LR decay horizon)
    c.batch_size = 8  # global rows of data.seq_len tokens per optimizer step (all processes and micro-batches)
    c.grad_accum_steps = 1  # micro-batches per optimizer step (scan over batch_size // grad_accum_steps rows each)
    c.model = model_fields()  # the network: preset + overrides -> ModelConfig (see training/run.py)
    c.remat = ""  # command-line shorthand for model.remat (none, full, save_dots, ...); set, it wins; "" = model.remat
    # start from this checkpoint dir (HF / Mistral consolidated / mistral_jax): its architecture and weights, with
    # config.model's runtime choices (dtypes, backends, remat; max_seq_len if set); "" = random init
    c.init_from = ""

    c.data = ConfigDict()
    # a prepared dataset (a directory with manifest.json: python -m mistral_jax.data.prepare), or raw files: file /
    # dir / glob (.jsonl .json .txt .parquet, .gz / .zst; local, gs:// or s3://), or an HF hub dataset name
    c.data.train = ""
    c.data.mixture = ""  # weighted prepared datasets instead of data.train, e.g. "web:0.7,code:0.2,math:0.1"
    c.data.datasets = ""  # the mixture's names -> prepared directories, e.g. "web=gs://b/web,code=/d/code,math=/d/m"
    c.data.allow_mixture_change = False  # resume with other mixture weights (same global batch, the new weights)
    c.data.read_threads = 4  # prepared data: Grain's reading threads per process
    c.data.prefetch = 4  # prepared data: batches read ahead per process
    c.data.train_split = "train"  # split of a hub dataset used for training
    c.data.validation = ""  # held-out data, same forms as `train`; "" = no periodic eval
    c.data.validation_split = "validation"  # split of a hub dataset used for eval
    c.data.hub_config = ""  # hub dataset configuration name (e.g. "en" for allenai/c4)
    c.data.text_field = "text"  # column / JSON key holding the document text
    # sentencepiece .model or Mistral's mistral:v1 (32k) / mistral:v3; "" = the prepared data's, else train one
    c.data.tokenizer = ""
    c.data.tokenizer_vocab_size = 512  # vocabulary of a tokenizer trained by the run (when data.tokenizer == "")
    c.data.seq_len = 64  # tokens per packed row
    c.data.add_bos = True  # prepend <s> to every document (Mistral's default)
    c.data.add_eos = True  # append </s> to every document so the model learns where documents end
    c.data.shuffle = True  # shuffle document order each epoch (seed + epoch): deterministic
    c.data.shuffle_buffer = 10_000  # shuffle buffer of streamed hub datasets
    c.data.on_decode_error = "replace"  # non-UTF-8 input: "replace" (U+FFFD + one warning per file) or "error"
    # instruction fine-tuning (the recipes of training/recipe.py: chat data in data/chat.py, adapters in lora.py)
    # "text": documents (pretraining); "chat": messages lists, Mistral template, answer loss; "preference": prompt +
    # chosen / rejected pairs (data/preference.py), trained with the config.preference objective
    c.data.format = "text"
    c.data.messages_field = "messages"  # chat: column holding the messages (also reads ShareGPT / Alpaca layouts)
    c.data.max_conversations = 0  # chat: read at most this many conversations (0 = all)
    c.data.skip_invalid = False  # chat / preference: drop invalid records (counted) instead of failing
    c.data.pairs_per_row = 1  # preference: pairs packed per row (1 = one right-padded pair per row, as TRL)
    c.data.max_pairs = 0  # preference: read at most this many pairs (0 = all)

    # each registered recipe's own block, config.<recipe name>, with the defaults the recipe declares
    # (Recipe.config_defaults; e.g. config.preference: DPO / ORPO, training/preference.py)
    for name, block in recipe.config_blocks().items():
        c[name] = block

    c.lora = ConfigDict()
    c.lora.rank = 0  # LoRA adapter rank; 0 = no LoRA (every weight trains)
    c.lora.alpha = 16.0  # LoRA scale numerator: the update is (alpha / rank) * A @ B
    c.lora.targets = "all"  # adapted weights: comma list of wq,wk,wv,wo,w1,w2,w3 (or q_proj..down_proj) or "all"
    c.lora.quantize_base = ""  # QLoRA's frozen base: "int8" (per-channel scales), "int4" (scale per 64 rows), "": as is

    c.optimizer = ConfigDict()
    c.optimizer.name = "adamw"  # only AdamW (decoupled weight decay)
    c.optimizer.learning_rate = 3e-4  # peak learning rate after warmup
    c.optimizer.schedule = "cosine"  # after warmup: cosine | linear (decay to min_lr_ratio * peak) | constant
    c.optimizer.warmup_steps = 100  # linear warmup from 0
    c.optimizer.min_lr_ratio = 0.1  # final LR as a fraction of the peak
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.95  # Adam beta2
    c.optimizer.eps = 1e-8  # Adam epsilon
    c.optimizer.weight_decay = 0.1  # decoupled weight decay
    c.optimizer.decay_norms = False  # apply weight decay to RMSNorm scales too
    c.optimizer.decay_embeddings = False  # apply weight decay to the token embedding too
    c.optimizer.grad_clip_norm = 1.0  # clip gradients to this global norm (0 = off)

    c.mesh = ConfigDict()
    c.mesh.data = 1  # pure data parallelism (replicated params); -1 = fill the devices
    c.mesh.fsdp = -1  # fully sharded data parallelism; -1 = fill the devices
    c.mesh.context = 1  # context parallelism: the sequence split over chips (ring / halo attention, long context)
    c.mesh.tensor = 1  # tensor parallelism (heads / mlp / vocab)
    c.mesh.expert = 1  # expert parallelism (Mixtral experts)
    # multi-slice TPU: data/fsdp/context/tensor/expert above lay out one slice (ICI); dcn_* repeat data / fsdp over the
    # slices (DCN): the mesh's data axis is dcn_data * data, fsdp is dcn_fsdp * fsdp; dcn_data * dcn_fsdp = slices
    c.mesh.dcn_data = 1  # data parallelism across slices (the usual multi-slice choice)
    c.mesh.dcn_fsdp = 1  # FSDP across slices (parameter all-gathers over DCN: for models one slice cannot hold)
    c.mesh.rules = "auto"  # logical -> mesh axis rules: auto (EP if expert>1, TP if tensor>1, else FSDP) or a preset

    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 200  # save every N steps (and at the end, and on SIGTERM / SIGINT)
    c.checkpoint.keep = 3  # keep the newest K checkpoints
    c.checkpoint.async_save = True  # write checkpoints in the background while training continues
    c.checkpoint.resume = True  # resume from the newest intact checkpoint in {workdir}/checkpoints
    # start over: move the workdir's run (checkpoints, configs, metrics) to {workdir}/archive/<time>/, never
    # deleted; a requeued job with the same config resumes instead of archiving again
    c.checkpoint.reset = False
    # emergency checkpoints: a local tier on each host's own disk (a RAM disk like /dev/shm, or a local SSD) saved
    # every local_every_steps between the persistent saves; "" = off. Needs mesh.data (or dcn_data) >= 2 with each
    # replica on its own hosts (Orbax's emergency manager): docs/operating.md
    c.checkpoint.local_dir = ""
    c.checkpoint.local_every_steps = 20  # a few minutes of a pod run (persistent: every_steps, ~an hour)
    c.checkpoint.local_keep = 2  # local steps kept on each host

    c.profile = ConfigDict()
    # "100:105": a jax.profiler trace of the steps that make 100..104 into {workdir}/profile/ (XProf, TensorBoard)
    c.profile.steps = ""
    c.profile.processes = "0"  # "0": process 0 traces; "all": every process

    c.goodput = ConfigDict()  # Google's ml-goodput-measurement recorder, beside the offline categories (always on)
    # "" off; "file": {workdir}/goodput_log.jsonl (a local workdir); "cloud": Cloud Logging on GCP (process 0)
    c.goodput.recorder = ""
    c.goodput.job_name = ""  # the recorder's job name ("" = the workdir's last path component)

    c.wandb = ConfigDict()  # Weights & Biases beside metrics.jsonl and TensorBoard (process 0; the wandb extra)
    c.wandb.project = ""  # "" = off; WANDB_MODE=offline keeps the run in {workdir}/wandb/ for `wandb sync`
    c.wandb.entity = ""  # "" = W&B's default entity
    c.wandb.name = ""  # the run's display name ("" = the workdir's last path component)
    c.wandb.figures = True  # log the run report's figures as images at the end of the run

    c.watchdog = ConfigDict()  # a step far slower than usual: every process dumps its stacks, names the slow one
    c.watchdog.enabled = True  # False: no watchdog thread
    c.watchdog.factor = 10.0  # a step may take max(min_seconds, factor x the median step time)
    c.watchdog.min_seconds = 300.0  # the shortest limit of a step, whatever the median
    c.watchdog.compile_seconds = 3600.0  # the limit of the first step of a run (it compiles)
    c.watchdog.exit = False  # True: after the report, every process exits 75 (a scheduler restarts the job)

    c.log_every = 10  # write metrics (JSONL + TensorBoard) every N steps
    c.eval_every = 200  # held-out eval every N steps (needs data.validation); 0 = only at the end
    c.eval_steps = 10  # batches per eval (fewer if the split is smaller)
    c.nan_policy = "stop"  # non-finite loss: "stop" (raise, params untouched) or "skip" (drop the update)
    c.progress_bar = True  # tqdm progress bar on process 0
    c.peak_flops = 0.0  # device peak FLOP/s for MFU; 0 = built-in table, or a measured matmul peak on CPU
    return c


def instruct_sft(c: ConfigDict) -> ConfigDict:
    """The instruction fine-tuning recipe shared by the instruct configs: UltraChat-200k with Mistral's chat
    template (loss on assistant answers), packed 4096-token rows, 0.5M tokens per step, from ``init_from``."""
    c.model.remat = "full"  # recompute each layer in the backward pass
    c.init_from = config_dict.placeholder(str)  # REQUIRED: --config.init_from=PATH of the base checkpoint
    c.num_steps = 1500  # ~3 epochs of UltraChat-200k (~250M tokens) at 0.5M tokens per step
    c.batch_size = 128  # packed rows per step: 128 x 4096 = 0.5M tokens
    c.grad_accum_steps = 1  # raise if the per-chip micro-batch does not fit
    c.data.format = "chat"  # Mistral template, loss on assistant answers and their </s>
    c.data.train = "HuggingFaceH4/ultrachat_200k"  # HF hub chat dataset with a `messages` column (or local .jsonl)
    c.data.train_split = "train_sft"  # UltraChat's SFT training split
    c.data.validation = "HuggingFaceH4/ultrachat_200k"  # held-out conversations of the same set
    c.data.validation_split = "test_sft"  # UltraChat's SFT test split
    c.data.messages_field = "messages"  # column holding the conversation
    c.data.skip_invalid = True  # a few web conversations break the role rules: drop them (count logged)
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model (= mistral:v1 for the v0.1 bases); set one to override
    c.data.seq_len = 4096  # tokens per packed row (the sliding window); longer conversations are cut at turns
    c.optimizer.warmup_steps = 50  # ~3% warmup
    c.optimizer.min_lr_ratio = 0.1  # cosine to 10% of the peak
    c.optimizer.weight_decay = 0.0  # no decay when fine-tuning
    c.lora.alpha = 32.0  # LoRA scale numerator (update = alpha / rank * A @ B)
    c.lora.targets = "all"  # attention q,k,v,o and the MLP (or every expert's w1,w2,w3)
    c.mesh.fsdp = -1  # shard params and optimizer state over every chip (the remaining ones with mesh.expert)
    c.checkpoint.every_steps = 250  # ~6 checkpoints
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 250  # held-out answer loss with every checkpoint
    c.eval_steps = 20  # 20 x 128 rows
    c.progress_bar = False  # logs only on clusters
    return c
