"""Mistral NeMo 12B pretraining (40 layers, dim 5120, head_dim 128, tekken vocabulary of 131072); one v5p-256 /
32 x 8-GPU-node scale run.

The 7B recipe (AdamW 0.9 / 0.95, 2k warmup, cosine to 10%, 4M-token batches, bf16 compute, float32 master weights,
full remat) at the NeMo geometry, with Mistral's tekken tokenizer (``mistral:tekken``, tiktoken-based, shipped in
mistral-common). No sliding window; theta 1e6 as released (NeMo's 128k context comes from long-context training
after this stage: raise ``data.seq_len`` then).

    python train.py --config configs/mistral_nemo_12b.py --workdir /mnt/runs/nemo
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "mistral_nemo_12b"  # 40 layers, dim 5120, 32/8 heads x 128, hidden 14336, vocab 131072
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (params stay float32 master weights)
    c.model.remat = "full"  # recompute each layer in the backward pass
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.num_steps = 250_000  # 250k x 4M tokens = ~1T tokens
    c.batch_size = 512  # rows per step: 512 x 8192 = 4.2M tokens
    c.grad_accum_steps = 4  # 128-row micro-batches: 1 row/chip on v5p-256 (131072-wide logits per row)
    c.data.train = "allenai/c4"  # HF hub dataset, streamed (or a local .jsonl/.parquet glob)
    c.data.hub_config = "en"  # c4 configuration
    c.data.validation = "allenai/c4"  # held-out split of the same dataset
    c.data.validation_split = "validation"  # c4 validation split
    c.data.tokenizer = "mistral:tekken"  # Mistral's tekken tokenizer, 131072 ids (mistral-common, offline)
    c.data.tokenizer_vocab_size = 131072  # = model vocab_size (only read if data.tokenizer = "": train one)
    c.data.seq_len = 8192  # tokens per packed row
    c.optimizer.learning_rate = 3e-4  # peak
    c.optimizer.warmup_steps = 2000  # linear warmup
    c.optimizer.min_lr_ratio = 0.1  # cosine to 3e-5
    c.optimizer.weight_decay = 0.1  # decoupled decay on matrices
    c.mesh.fsdp = -1  # shard params and optimizer state over every chip (ZeRO-3)
    c.checkpoint.every_steps = 1000  # ~every hour
    c.checkpoint.keep = 3  # newest three
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 1000  # held-out loss with every checkpoint
    c.eval_steps = 20  # 20 x 512 x 8192 tokens
    c.progress_bar = False  # logs only on clusters
    return c
