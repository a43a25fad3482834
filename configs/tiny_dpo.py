"""CPU demo of preference tuning (DPO): the tiny model of the demo, tuned on the bundled preference set (self-written
prompt / chosen / rejected pairs, CC0: ``mistral_jax/data/corpus/preference_*.jsonl``).

    make demo                                                                     # trains runs/demo
    python train.py --config configs/tiny_dpo.py --config.init_from=runs/demo --workdir runs/dpo
    python train.py --config configs/tiny_dpo.py --config.init_from=runs/demo --workdir runs/dpo_lora \
        --config.lora.rank=8 --config.optimizer.learning_rate=3e-3                  # LoRA: reference = adapters off
    python train.py --config configs/tiny_dpo.py --config.init_from=runs/demo --workdir runs/orpo \
        --config.preference.objective=orpo                                          # ORPO: no reference model

The reference model is the ``init_from`` checkpoint (frozen); metrics.jsonl / TensorBoard get TRL's names
(``rewards/accuracies``, ``rewards/margins``, ``logps/chosen`` ...) every ``log_every`` steps and the held-out
preference accuracy (``eval/rewards/accuracies``) every ``eval_every`` steps.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"  # only used without init_from; the network comes from init_from's config
    c.init_from = "runs/demo"  # the model to tune and the frozen DPO reference: weights + tokenizer.model
    c.num_steps = 30  # ~2.3 epochs of the 200 training pairs (13 batches of 16); longer overfits
    c.batch_size = 16  # pairs per step (one pair per row: [16, 2, seq_len])
    c.data.format = "preference"  # prompt + chosen / rejected, Mistral chat format, loss on the answers
    c.data.train = "bundled"  # mistral_jax/data/corpus/preference_train.jsonl
    c.data.validation = "bundled"  # mistral_jax/data/corpus/preference_validation.jsonl (48 held-out pairs)
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model
    c.data.seq_len = 96  # positions per sequence (the longest bundled pair needs 65 with the demo tokenizer)
    c.data.pairs_per_row = 1  # one right-padded pair per row
    c.preference.objective = "dpo"  # DPO against the frozen init_from model ("orpo": no reference)
    c.preference.loss_type = "sigmoid"  # the DPO paper's loss
    c.preference.beta = 0.1  # DPO's beta
    c.optimizer.learning_rate = 3e-4  # full tuning of a tiny model; ~3e-3 with LoRA
    c.optimizer.warmup_steps = 5  # short warmup
    c.optimizer.schedule = "constant"  # constant after warmup
    c.optimizer.weight_decay = 0.0  # no decay for a short fine-tune
    c.lora.rank = 0  # 0 = full fine-tuning; e.g. 8 trains only rank-8 adapters (the reference is adapters off)
    c.lora.alpha = 16.0  # LoRA update scale numerator (alpha / rank)
    c.lora.targets = "all"  # wq,wk,wv,wo,w1,w2,w3
    c.checkpoint.every_steps = 15  # two checkpoints
    c.log_every = 5  # metrics every 5 steps
    c.eval_every = 10  # held-out preference accuracy every 10 steps (and at the end)
    c.eval_steps = 3  # the 48 held-out pairs fill 3 batches of 16
    return c
