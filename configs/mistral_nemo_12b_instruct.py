"""Mistral NeMo 12B instruction fine-tuning from the released base checkpoint (Mistral-Nemo-Base-2407).

    python train.py --config configs/mistral_nemo_12b_instruct.py --workdir runs/nemo_sft \
        --config.init_from=/path/to/Mistral-Nemo-Base-2407

Full fine-tuning on UltraChat-200k with the tekken v3 chat format rendered by mistral-common (``mistral:tekken``:
``<s>[INST]{user}[/INST]{answer}</s>``, control ids, the system prompt before the last user turn), the loss on
answers and their ``</s>``. LoRA instead: ``--config.lora.rank=16 --config.optimizer.learning_rate=2e-4``.
"""

from configs import base


def get_config():
    c = base.instruct_sft(base.get_config())
    c.model.preset = "mistral_nemo_12b"  # documentation only: the network is read from init_from
    c.model.dtype = "bfloat16"  # bf16 activations / matmuls (params stay in the checkpoint's dtype unless param_dtype)
    c.model.param_dtype = "float32"  # float32 master weights for full fine-tuning (bf16 is fine with LoRA)
    c.model.loss_chunk_size = 1024  # loss over 1024-position chunks: never the [B, T, V] float32 logits at once
    c.data.tokenizer = "mistral:tekken"  # the base model's tokenizer and chat format (tekken, v3), in mistral-common
    c.optimizer.learning_rate = 1e-5  # peak for full fine-tuning of a 12B model (cosine to 1e-6)
    c.optimizer.b2 = 0.95  # Adam beta2
    c.lora.rank = 0  # 0 = full fine-tuning; 16 = LoRA adapters on lora.targets
    c.checkpoint.keep = 2  # newest two
    return c
