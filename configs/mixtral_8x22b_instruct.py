"""Mixtral 8x22B instruction fine-tuning from the released base checkpoint, experts sharded over `mesh.expert`.

    python train.py --config configs/mixtral_8x22b_instruct.py --workdir runs/mx22_sft \
        --config.init_from=/path/to/Mixtral-8x22B-v0.1 --config.mesh.expert=8

LoRA by default (rank 16 on attention and every expert's w1/w2/w3; the router stays frozen): full fine-tuning of
141B parameters needs ~2.25 TB for float32 weights + Adam. Mistral's v3 chat format through mistral-common
(``mistral:v3``: ``[INST]`` / ``[/INST]`` control tokens), the loss on answers and their ``</s>``.
"""

from configs import base


def get_config():
    c = base.instruct_sft(base.get_config())
    c.model.preset = "mixtral_8x22b"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls
    c.model.router_aux_loss_coef = 0.001  # load-balancing loss weight (HF units, as released)
    c.model.router_z_loss_coef = 1e-3  # router z-loss weight
    c.model.moe_impl = "ragged"  # dropless grouped expert matmuls (expert-parallel under mesh.expert > 1)
    c.model.moe_chunk_tokens = 2048  # expert parallelism: each chip dispatches 2048 tokens at a time (bounds buffers)
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.data.tokenizer = "mistral:v3"  # the base model's tokenizer and chat format (v3), shipped in mistral-common
    c.optimizer.learning_rate = 1e-4  # LoRA peak (use ~5e-6 for full fine-tuning)
    c.lora.rank = 16  # adapter rank (0 = full fine-tuning)
    c.mesh.expert = 8  # one expert per expert-parallel group
    c.checkpoint.keep = 3  # newest three (adapters only: small checkpoints)
    return c
