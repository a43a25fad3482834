"""Mistral 7B (v0.1 geometry) pretraining on a streamed web corpus; one v5p-128 / 16 x 8-GPU-node scale run.

Hyper-parameters follow Llama-2 / Mistral-style 7B recipes: AdamW (0.9, 0.95), peak 3e-4, 2k warmup, cosine to
10%, weight decay 0.1 (not on norms / embeddings), clip 1.0, 4M-token batches (512 x 8192), bf16 compute with
float32 master weights, full remat.

    python train.py --config configs/mistral_7b.py --workdir /mnt/runs/m7b

The tokenizer is Mistral's own 32k sentencepiece model (``data.tokenizer = "mistral:v1"``, the file mistral-common
ships), so the run's ids are those of the released Mistral 7B and its exports load in Mistral's tooling.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "mistral_7b_v01"  # 32 layers, dim 4096, GQA 32/8 heads, 4096-token sliding window, theta 1e4
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (params stay float32 master weights)
    c.model.remat = "full"  # recompute each layer in the backward pass (activation memory ~ one layer)
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.num_steps = 250_000  # 250k x 4M tokens = ~1T tokens
    c.batch_size = 512  # rows per step: 512 x 8192 = 4.2M tokens
    c.grad_accum_steps = 2  # 256-row micro-batches: 4 rows/chip on v5p-128 (accum 1 also fits: 44.2 GiB/chip, README)
    c.data.train = "allenai/c4"  # HF hub dataset, streamed (or a local .jsonl/.parquet glob)
    c.data.hub_config = "en"  # c4 configuration
    c.data.validation = "allenai/c4"  # held-out split of the same dataset
    c.data.validation_split = "validation"  # c4 validation split
    c.data.tokenizer = "mistral:v1"  # Mistral's 32k sentencepiece tokenizer (shipped in mistral-common, offline)
    c.data.tokenizer_vocab_size = 32000  # = model vocab_size (only read if data.tokenizer = "": train one)
    c.data.seq_len = 8192  # tokens per packed row (two sliding windows)
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
