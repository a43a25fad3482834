"""CPU demo of instruction fine-tuning: the tiny Mistral pretrained by ``configs/tiny.py``, tuned on the bundled
tiny instruction set (150 self-written conversations: single / multi-turn, some with a system prompt).

    make demo                                                                     # trains runs/demo
    python train.py --config configs/tiny_sft.py --workdir runs/demo_sft --config.init_from=runs/demo
    python train.py --config configs/tiny_sft.py --workdir runs/demo_lora --config.init_from=runs/demo \
        --config.lora.rank=8                                                      # LoRA instead of full tuning
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"  # only used without init_from; the network comes from init_from's config
    c.init_from = "runs/demo"  # the pretrained tiny run (`make demo`'s workdir, configs/tiny.py): weights + tokenizer
    c.num_steps = 150  # ~9 epochs of the 134 training conversations (~17 batches each)
    c.batch_size = 8  # packed rows per step
    c.data.format = "chat"  # messages lists -> Mistral template, loss on answers (+ </s>) only
    c.data.train = "bundled"  # mistral_jax/data/corpus/instruct_train.jsonl
    c.data.validation = "bundled"  # mistral_jax/data/corpus/instruct_validation.jsonl (16 held-out conversations)
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model
    c.data.seq_len = 128  # tokens per packed row (2-4 short conversations)
    c.optimizer.learning_rate = 1e-3  # full fine-tuning of a tiny model; use ~3e-3 with LoRA
    c.optimizer.warmup_steps = 10  # short warmup
    c.optimizer.min_lr_ratio = 0.1  # cosine to 1e-4
    c.optimizer.weight_decay = 0.0  # no decay for a short fine-tune
    c.lora.rank = 0  # 0 = full fine-tuning; e.g. 8 trains only rank-8 adapters
    c.lora.alpha = 16.0  # LoRA update scale numerator (alpha / rank)
    c.lora.targets = "all"  # wq,wk,wv,wo,w1,w2,w3
    c.checkpoint.every_steps = 50  # three checkpoints
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 50  # held-out answer loss every 50 steps
    c.eval_steps = 4  # the whole validation set fits in 4 batches
    return c
