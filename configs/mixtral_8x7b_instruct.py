"""Mixtral 8x7B instruction fine-tuning from a released base checkpoint, experts sharded over `mesh.expert`.

    python train.py --config configs/mixtral_8x7b_instruct.py --workdir runs/mx_sft \
        --config.init_from=/path/to/Mixtral-8x7B-v0.1 --config.mesh.expert=8

LoRA by default (rank 16 on attention and every expert's w1/w2/w3; the router stays frozen): full fine-tuning of
47B parameters needs ~750 GB for float32 weights + Adam; set ``--config.lora.rank=0`` on a pod that has it.
"""

from configs import base


def get_config():
    c = base.instruct_sft(base.get_config())
    c.model.preset = "mixtral_8x7b"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls
    c.model.router_aux_loss_coef = 0.02  # load-balancing loss weight (HF units, as released)
    c.model.router_z_loss_coef = 1e-3  # router z-loss weight
    c.model.moe_impl = "ragged"  # dropless grouped expert matmuls (expert-parallel under mesh.expert > 1)
    c.model.moe_chunk_tokens = 2048  # expert parallelism: each chip dispatches 2048 tokens at a time (bounds buffers)
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.optimizer.learning_rate = 2e-4  # LoRA peak (use ~1e-5 for full fine-tuning)
    c.lora.rank = 16  # adapter rank (0 = full fine-tuning)
    c.mesh.expert = 8  # one expert per expert-parallel group
    c.checkpoint.keep = 3  # newest three (adapters only: small checkpoints)
    return c
