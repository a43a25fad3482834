"""Mixtral 8x22B pretraining (56 layers, 8 experts x 16384, top-2; 141B parameters, 39B active) with expert
parallelism; a v5p-512 (256 chips) / 32 x 8-GPU-node scale run.

The recipe of ``configs/mixtral_8x7b.py`` at the 8x22B geometry: load-balancing loss 0.001 (HF units, as released
in Mixtral-8x22B's config), router z-loss 1e-3, dropless ragged expert matmuls, experts over ``mesh.expert``, and
Mistral's v3 tokenizer (``mistral:v3``, 32768 pieces, shipped in mistral-common). Float32 master weights and Adam
moments take 16 bytes per parameter (2.25 TB: 8.8 GB per chip over 256 v5p chips, before activations).

    python train.py --config configs/mixtral_8x22b.py --workdir /mnt/runs/mx22
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "mixtral_8x22b"  # 56 layers, dim 6144, 48/8 heads, 8 experts x 16384, vocab 32768, theta 1e6
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (params stay float32 master weights)
    c.model.router_aux_loss_coef = 0.001  # load balancing loss weight (HF units, Mixtral-8x22B's released value)
    c.model.router_z_loss_coef = 1e-3  # router z-loss weight
    c.model.moe_impl = "ragged"  # dropless sort + grouped matmul
    c.model.moe_chunk_tokens = 2048  # expert parallelism: each chip dispatches 2048 tokens at a time (bounds buffers)
    c.model.remat = "full"  # recompute each layer in the backward pass
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.num_steps = 250_000  # ~1T tokens at 4M tokens per step
    c.batch_size = 512  # rows per step: 512 x 8192 = 4.2M tokens
    c.grad_accum_steps = 2  # 256-row micro-batches: 1 row/chip on v5p-512 (see the README's AOT table)
    c.data.train = "allenai/c4"  # HF hub dataset, streamed (or a local .jsonl/.parquet glob)
    c.data.hub_config = "en"  # c4 configuration
    c.data.validation = "allenai/c4"  # held-out split of the same dataset
    c.data.validation_split = "validation"  # c4 validation split
    c.data.tokenizer = "mistral:v3"  # Mistral's v3 sentencepiece tokenizer, 32768 pieces (mistral-common, offline)
    c.data.tokenizer_vocab_size = 32768  # = model vocab_size (only read if data.tokenizer = "": train one)
    c.data.seq_len = 8192  # tokens per packed row
    c.optimizer.learning_rate = 1.5e-4  # peak (larger MoE: lower than 8x7B's 2e-4)
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
