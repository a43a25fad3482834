"""Mistral 7B preference tuning (DPO) of an instruction-tuned checkpoint on UltraFeedback (binarized).

    python train.py --config configs/mistral_7b_dpo.py --workdir runs/m7b_dpo \
        --config.init_from=/path/to/Mistral-7B-Instruct-v0.2   # HF dir, Mistral consolidated dir or mistral_jax workdir

Full fine-tuning keeps a frozen copy of the ``init_from`` weights as the DPO reference (in the train state's frozen
part, not checkpointed). LoRA instead: ``--config.lora.rank=16 --config.optimizer.learning_rate=5e-6`` (adapters
only are trained; the reference is the same model with its adapters disabled, no second copy). ORPO (no
reference): ``--config.preference.objective=orpo --config.preference.beta=0.1``.
"""

from ml_collections import config_dict

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "mistral_7b_v02"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls
    c.model.param_dtype = "float32"  # float32 master weights (and reference copy) for full tuning; bf16 ok with LoRA
    c.model.remat = "full"  # recompute each layer in the backward pass
    c.init_from = config_dict.placeholder(str)  # REQUIRED: --config.init_from=PATH of the instruct checkpoint
    c.num_steps = 1900  # ~2 epochs of UltraFeedback's 61k training pairs at 64 pairs per step
    c.batch_size = 64  # pairs per step (rows of [2, seq_len]: chosen and rejected)
    c.grad_accum_steps = 4  # micro-batches of 16 pairs
    c.data.format = "preference"  # prompt + chosen / rejected, Mistral chat format, loss on the answers
    c.data.train = "HuggingFaceH4/ultrafeedback_binarized"  # HF hub preference set (or a local .jsonl)
    c.data.train_split = "train_prefs"  # UltraFeedback's preference training split
    c.data.validation = "HuggingFaceH4/ultrafeedback_binarized"  # held-out pairs of the same set
    c.data.validation_split = "test_prefs"  # UltraFeedback's preference test split
    c.data.skip_invalid = True  # a few records have empty answers: drop them (count logged)
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model (mistral:v1 / v3); set one to override
    c.data.seq_len = 1024  # positions per sequence (TRL's default max_length); longer pairs are dropped, not cut
    c.data.pairs_per_row = 1  # one right-padded pair per row (TRL's layout)
    c.preference.objective = "dpo"  # DPO against the frozen init_from model
    c.preference.loss_type = "sigmoid"  # the DPO paper's loss
    c.preference.beta = 0.1  # DPO's beta (Zephyr's value)
    c.optimizer.learning_rate = 5e-7  # full-tuning peak (Zephyr-7B-beta's); ~5e-6 with LoRA
    c.optimizer.warmup_steps = 190  # 10% warmup
    c.optimizer.schedule = "linear"  # linear decay after warmup
    c.optimizer.min_lr_ratio = 0.0  # to zero
    c.optimizer.weight_decay = 0.0  # no decay when fine-tuning
    c.lora.rank = 0  # 0 = full fine-tuning; 16 = LoRA adapters on lora.targets (reference: adapters disabled)
    c.lora.alpha = 32.0  # LoRA scale numerator (update = alpha / rank * A @ B)
    c.lora.targets = "all"  # attention q,k,v,o and the MLP
    c.mesh.fsdp = -1  # shard params, reference and optimizer state over every chip
    c.checkpoint.every_steps = 250  # ~8 checkpoints
    c.checkpoint.keep = 2  # newest two
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 250  # held-out preference accuracy with every checkpoint
    c.eval_steps = 16  # 16 x 64 = 1024 held-out pairs
    c.progress_bar = False  # logs only on clusters
    return c
