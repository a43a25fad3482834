"""Mixtral 8x7B instruction fine-tuning from a released base checkpoint, experts sharded over `mesh.expert`.

    python train.py --config configs/mixtral_8x7b_instruct.py --workdir runs/mx_sft \
        --config.init_from=/path/to/Mixtral-8x7B-v0.1 --config.mesh.expert=8

LoRA by default (rank 16 on attention and every expert's w1/w2/w3; the router stays frozen): full fine-tuning of
47B parameters needs ~750 GB for float32 weights + Adam; set ``--config.lora.rank=0`` on a pod that has it.
"""

from ml_collections import config_dict

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "mixtral_8x7b"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls
    c.model.router_aux_loss_coef = 0.02  # load-balancing loss weight (HF units, as released)
    c.model.router_z_loss_coef = 1e-3  # router z-loss weight
    c.model.moe_impl = "ragged"  # dropless grouped expert matmuls (expert-parallel under mesh.expert > 1)
    c.remat = "full"  # recompute each layer in the backward pass
    c.init_from = config_dict.placeholder(str)  # REQUIRED: --config.init_from=PATH of the base checkpoint
    c.num_steps = 1500  # ~3 epochs of UltraChat-200k at 0.5M tokens per step
    c.batch_size = 128  # packed rows per step: 128 x 4096 tokens
    c.grad_accum_steps = 1  # raise if the per-chip micro-batch does not fit
    c.data.format = "chat"  # Mistral template, loss on assistant answers and their </s>
    c.data.train = "HuggingFaceH4/ultrachat_200k"  # HF hub chat dataset with a `messages` column (or local .jsonl)
    c.data.train_split = "train_sft"  # UltraChat's SFT training split
    c.data.validation = "HuggingFaceH4/ultrachat_200k"  # held-out conversations of the same set
    c.data.validation_split = "test_sft"  # UltraChat's SFT test split
    c.data.messages_field = "messages"  # column holding the conversation
    c.data.skip_invalid = True  # a few web conversations break the role rules: drop them (count logged)
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model
    c.data.seq_len = 4096  # tokens per packed row
    c.optimizer.learning_rate = 2e-4  # LoRA peak (use ~1e-5 for full fine-tuning)
    c.optimizer.warmup_steps = 50  # ~3% warmup
    c.optimizer.min_lr_ratio = 0.1  # cosine to 10% of the peak
    c.optimizer.weight_decay = 0.0  # no decay when fine-tuning
    c.lora.rank = 16  # adapter rank (0 = full fine-tuning)
    c.lora.alpha = 32.0  # update scale numerator (alpha / rank = 2)
    c.lora.targets = "all"  # wq,wk,wv,wo + expert w1,w2,w3
    c.mesh.fsdp = -1  # shard the (frozen) weights over the remaining chips
    c.mesh.expert = 8  # one expert per expert-parallel group
    c.checkpoint.every_steps = 250  # adapters only: small checkpoints
    c.checkpoint.keep = 3  # newest three
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 250  # held-out answer loss
    c.eval_steps = 20  # eval batches
    c.progress_bar = False  # logs only on clusters
    return c
