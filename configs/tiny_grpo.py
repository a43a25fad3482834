"""CPU demo of RL with verifiable rewards (GRPO): the tiny chat model tuned on the bundled arithmetic word problems
(generated, GSM8K's layout: ``mistral_jax/data/arithmetic.py``), rewarded for the exact answer and the ``#### n``
format.

    make demo                                                                     # trains runs/demo
    python train.py --config configs/tiny_sft.py --workdir runs/arith_sft --config.init_from=runs/demo \
        --config.data.train=bundled:arithmetic --config.data.validation=bundled:arithmetic \
        --config.num_steps=600                                                    # the answer format, warm start
    python train.py --config configs/tiny_grpo.py --workdir runs/grpo             # GRPO from runs/arith_sft
    python train.py --config configs/tiny_grpo.py --workdir runs/grpo_lora --config.lora.rank=8 \
        --config.optimizer.learning_rate=3e-3                                     # LoRA: rollouts from base + adapters
    python train.py --config configs/tiny_grpo.py --workdir runs/rloo --config.grpo.loss_type=rloo   # RLOO

Each step samples ``grpo.num_generations`` completions of ``batch_size / num_generations`` prompts from the live
weights (the decoding core), scores them, and takes one optimizer step on the clipped objective. The same config
runs on GSM8K where the hub is reachable: ``--config.data.train=openai/gsm8k --config.data.hub_config=main
--config.data.validation=openai/gsm8k`` (a bigger model and ``data.seq_len`` too).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.recipe = "grpo"  # RL on prompts with verifiable rewards (training/grpo.py, training/rl.py)
    c.model.preset = "tiny"  # only used without init_from; the network comes from init_from's config
    c.init_from = "runs/arith_sft"  # the policy to tune (and the KL reference when grpo.beta > 0)
    c.num_steps = 300  # optimizer steps (one rollout each): ~1 minute on 2 CPU cores
    c.batch_size = 128  # completions per step: 16 prompts x 8 completions
    c.data.format = "prompts"  # records with a prompt and a reference answer (GSM8K layout: question / answer)
    c.data.train = "bundled"  # 2,000 generated arithmetic word problems
    c.data.validation = "bundled"  # 200 held-out problems
    c.data.tokenizer = ""  # "" = init_from's tokenizer.model
    c.data.seq_len = 96  # prompt + completion tokens per row (the chat prompts take ~50 with the demo tokenizer)
    c.grpo.loss_type = "grpo"  # grpo, dr_grpo, bnpo, dapo or rloo
    c.grpo.num_generations = 8  # G completions per prompt
    c.grpo.max_completion_length = 24  # new tokens per completion at most
    c.grpo.temperature = 1.0  # sampling temperature
    c.grpo.beta = 0.0  # no KL term (no reference model)
    c.grpo.eval_prompts = 200  # held-out problems answered greedily at each eval (all of them)
    c.optimizer.learning_rate = 3e-4  # full tuning of a tiny model
    c.optimizer.warmup_steps = 2  # short warmup
    c.optimizer.schedule = "constant"  # constant after warmup
    c.optimizer.weight_decay = 0.0  # no decay for a short fine-tune
    c.lora.rank = 0  # 0 = full fine-tuning; e.g. 8 trains only rank-8 adapters
    c.lora.alpha = 16.0  # LoRA update scale numerator (alpha / rank)
    c.lora.targets = "all"  # wq,wk,wv,wo,w1,w2,w3
    c.checkpoint.every_steps = 100  # three checkpoints
    c.log_every = 10  # metrics every 10 steps (rewards, lengths, clip fraction, rollout / train time)
    c.eval_every = 50  # held-out reward every 50 steps (and at the end)
    c.eval_steps = 1  # unused by grpo (its held-out measure is grpo.eval_prompts)
    return c
