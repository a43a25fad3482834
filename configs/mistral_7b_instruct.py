"""Mistral 7B instruction fine-tuning (the recipe shape of Mistral-7B-Instruct) from a released base checkpoint.

    python train.py --config configs/mistral_7b_instruct.py --workdir runs/m7b_sft \
        --config.init_from=/path/to/Mistral-7B-v0.1      # HF dir, Mistral consolidated dir or a mistral_jax workdir

Full fine-tuning of every weight on UltraChat-200k (public, ``messages`` lists) with Mistral's chat template and
the loss on assistant answers only. LoRA instead: ``--config.lora.rank=16 --config.optimizer.learning_rate=2e-4``
(adapters only are trained and checkpointed; ``mistral_jax.training.sft.merged_model(workdir)`` merges them).
"""

from ml_collections import config_dict

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "mistral_7b_v01"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (params stay in the checkpoint's dtype unless param_dtype)
    c.model.param_dtype = "float32"  # float32 master weights for full fine-tuning (bf16 is fine with LoRA)
    c.remat = "full"  # recompute each layer in the backward pass
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
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model (Mistral's 32k sentencepiece)
    c.data.seq_len = 4096  # tokens per packed row (the sliding window); longer conversations are cut at turns
    c.optimizer.learning_rate = 2e-5  # peak for full fine-tuning of a 7B model
    c.optimizer.warmup_steps = 50  # ~3% warmup
    c.optimizer.min_lr_ratio = 0.1  # cosine to 2e-6
    c.optimizer.b2 = 0.95  # Adam beta2
    c.optimizer.weight_decay = 0.0  # no decay when fine-tuning
    c.lora.rank = 0  # 0 = full fine-tuning; 16 = LoRA adapters on lora.targets
    c.lora.alpha = 32.0  # LoRA scale numerator (update = alpha / rank * A @ B)
    c.lora.targets = "all"  # q,k,v,o and the MLP projections
    c.mesh.fsdp = -1  # shard params and optimizer state over every chip
    c.checkpoint.every_steps = 250  # ~6 checkpoints
    c.checkpoint.keep = 2  # newest two
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 250  # held-out answer loss with every checkpoint
    c.eval_steps = 20  # 20 x 128 rows
    c.progress_bar = False  # logs only on clusters
    return c
