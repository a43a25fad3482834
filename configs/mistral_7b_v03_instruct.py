"""Mistral 7B v0.3 instruction fine-tuning (the recipe shape of Mistral-7B-Instruct-v0.3) from the released base.

    python train.py --config configs/mistral_7b_v03_instruct.py --workdir runs/m7b_v03_sft \
        --config.init_from=/path/to/Mistral-7B-v0.3      # HF dir, Mistral consolidated dir or a mistral_jax workdir

Full fine-tuning on UltraChat-200k with Mistral's v3 chat format rendered by mistral-common (``[INST]`` / ``[/INST]``
control tokens, the system prompt before the last user turn), the loss on assistant answers and their ``</s>``.
LoRA instead: ``--config.lora.rank=16 --config.optimizer.learning_rate=2e-4``.
"""

from configs import base


def get_config():
    c = base.instruct_sft(base.get_config())
    c.model.preset = "mistral_7b_v03"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (params stay in the checkpoint's dtype unless param_dtype)
    c.model.param_dtype = "float32"  # float32 master weights for full fine-tuning (bf16 is fine with LoRA)
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.data.tokenizer = "mistral:v3"  # the base model's tokenizer and chat format (v3), shipped in mistral-common
    c.optimizer.learning_rate = 2e-5  # peak for full fine-tuning of a 7B model (cosine to 2e-6)
    c.optimizer.b2 = 0.95  # Adam beta2
    c.lora.rank = 0  # 0 = full fine-tuning; 16 = LoRA adapters on lora.targets
    c.checkpoint.keep = 2  # newest two
    return c
