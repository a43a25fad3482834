"""Mistral 7B RL with verifiable rewards (GRPO) on GSM8K, from an instruction-tuned checkpoint.

    python train.py --config configs/mistral_7b_grpo.py --workdir runs/m7b_grpo \
        --config.init_from=/path/to/Mistral-7B-Instruct-v0.2   # HF dir, Mistral consolidated dir or mistral_jax workdir
    python -m mistral_jax.aot --config configs/mistral_7b_grpo.py --topology v5p-8     # proof of fit, from any host

Each step samples 8 completions of 8 GSM8K questions from the live weights (rollouts on the training mesh, the
rolling-buffer cache for 64 rows), scores them (exact answer after ``####``, the format), and takes one optimizer step
on the clipped GRPO objective with a k3 KL (beta 0.04) to the frozen starting weights (a copy in the train state's
frozen part; with LoRA, ``--config.lora.rank=16``, the base with its adapters off: no copy). The AOT tool reports the
train step and the rollout's decode and prefill programs per chip, with the train state resident.
"""

from ml_collections import config_dict

from configs import base


def get_config():
    c = base.get_config()
    c.recipe = "grpo"  # RL on prompts with verifiable rewards (training/grpo.py, training/rl.py)
    c.model.preset = "mistral_7b_v02"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (and rollouts)
    c.model.param_dtype = "float32"  # float32 master weights (and reference copy) for full tuning
    c.model.remat = "full"  # recompute each layer in the backward pass
    c.init_from = config_dict.placeholder(str)  # REQUIRED: --config.init_from=PATH of the instruct checkpoint
    c.num_steps = 500  # ~0.5 epoch of GSM8K's 7,473 training problems at 8 per step
    c.batch_size = 64  # completions per step: 8 prompts x 8 completions
    c.data.format = "prompts"  # GSM8K records: question / answer ("... #### 42")
    c.data.train = "openai/gsm8k"  # HF hub dataset (or a local .jsonl of the same layout; "bundled" offline)
    c.data.hub_config = "main"  # GSM8K's configuration
    c.data.train_split = "train"  # GSM8K's training split
    c.data.validation = "openai/gsm8k"  # held-out problems of the same set
    c.data.validation_split = "test"  # GSM8K's test split
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model
    c.data.seq_len = 1024  # prompt (< 512 tokens for GSM8K) + completion tokens per row
    c.grpo.loss_type = "grpo"  # grpo, dr_grpo, bnpo, dapo or rloo
    c.grpo.num_generations = 8  # G completions per prompt
    c.grpo.max_completion_length = 512  # new tokens per completion at most
    c.grpo.temperature = 1.0  # sampling temperature
    c.grpo.beta = 0.04  # KL to the starting weights (DeepSeekMath's value)
    c.grpo.epsilon_high = 0.28  # DAPO's asymmetric clipping (epsilon_low stays 0.2)
    c.grpo.eval_prompts = 256  # held-out problems answered greedily at each eval
    c.optimizer.learning_rate = 1e-6  # full-tuning peak
    c.optimizer.warmup_steps = 20  # short warmup
    c.optimizer.schedule = "constant"  # constant after warmup
    c.optimizer.weight_decay = 0.0  # no decay when fine-tuning
    c.lora.rank = 0  # 0 = full fine-tuning; 16 = LoRA adapters (rollouts from base + adapters, unmerged)
    c.lora.alpha = 32.0  # LoRA scale numerator (update = alpha / rank * A @ B)
    c.lora.targets = "all"  # attention q,k,v,o and the MLP
    c.mesh.fsdp = -1  # shard params, reference, optimizer state and the rollout cache's rows over every chip
    c.checkpoint.every_steps = 50  # checkpoints
    c.checkpoint.keep = 2  # newest two
    c.log_every = 1  # metrics every step (rewards, lengths, clip fraction, KL, rollout / train time)
    c.eval_every = 100  # held-out reward every 100 steps
    c.progress_bar = False  # logs only on clusters
    return c
