"""Mixtral 8x7B pretraining (8 experts, top-2) with expert parallelism; a v5p-512 / 64 x 8-GPU-node scale run.

Same recipe as Mistral 7B plus the MoE terms: load-balancing loss 0.02 (HF units, as released), router z-loss
1e-3 (ST-MoE) for router stability, dropless ragged expert matmuls, experts sharded over `mesh.expert`.

    python train.py --config configs/mixtral_8x7b.py --workdir /mnt/runs/mx --config.mesh.expert=8
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "mixtral_8x7b"  # 32 layers, dim 4096, 8 experts x 14336 hidden, top-2, no window, theta 1e6
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (params stay float32 master weights)
    c.model.router_aux_loss_coef = 0.02  # load balancing loss weight (HF units)
    c.model.router_z_loss_coef = 1e-3  # router z-loss weight
    c.model.moe_impl = "ragged"  # dropless sort + grouped matmul
    c.model.moe_chunk_tokens = 2048  # expert parallelism: each chip dispatches 2048 tokens at a time (bounds buffers)
    c.model.remat = "full"  # recompute each layer in the backward pass
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.num_steps = 250_000  # ~1T tokens at 4M tokens per step
    c.batch_size = 512  # rows per step: 512 x 8192 = 4.2M tokens
    c.grad_accum_steps = 8  # 64-row micro-batches: v5p-128 at 26.0 of 95 GiB/chip (AOT, see README; 1 fits too)
    c.data.train = "allenai/c4"  # HF hub dataset, streamed (or a local .jsonl/.parquet glob)
    c.data.hub_config = "en"  # c4 configuration
    c.data.validation = "allenai/c4"  # held-out split of the same dataset
    c.data.validation_split = "validation"  # c4 validation split
    c.data.tokenizer = "mistral:v1"  # Mistral's 32k sentencepiece tokenizer (shipped in mistral-common, offline)
    c.data.tokenizer_vocab_size = 32000  # = model vocab_size (only read if data.tokenizer = "": train one)
    c.data.seq_len = 8192  # tokens per packed row
    c.optimizer.learning_rate = 2e-4  # peak (MoE: a little lower than dense)
    c.optimizer.warmup_steps = 2000  # linear warmup
    c.optimizer.weight_decay = 0.1  # decoupled decay on matrices
    c.mesh.fsdp = -1  # shard params / optimizer state over the remaining chips
    c.mesh.expert = 8  # one expert per expert-parallel group
    c.checkpoint.every_steps = 500  # ~every hour
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 1000  # held-out loss
    c.eval_steps = 20  # eval batches
    c.progress_bar = False  # logs only on clusters
    return c
