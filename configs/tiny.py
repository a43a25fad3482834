"""CPU demo: the tiny Mistral (2 layers, dim 64, window 16) on the bundled CPython-docs corpus, ~1-2 min on 2 cores.

    python train.py --config configs/tiny.py --workdir runs/demo   # the training step of `make demo`
"""

from configs import base
from mistral_jax.data import corpus


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"  # ModelConfig.tiny(): vocab 512, dim 64, 2 layers, 4 heads / 2 kv heads, window 16
    c.num_steps = 300  # ~76k tokens/100 steps: a few epochs' worth of the 225k-token corpus in a couple of minutes
    c.batch_size = 16  # rows per step (16 x 64 = 1,024 tokens)
    c.data.train = corpus.TRAIN  # bundled CPython documentation (PSF-2.0), 337 documents
    c.data.validation = corpus.VALIDATION  # held-out 17 documents of the same source
    c.data.tokenizer = ""  # train a 512-piece BPE tokenizer on the corpus into {workdir}/tokenizer.model
    c.data.tokenizer_vocab_size = 512  # = model vocab_size
    c.data.seq_len = 64  # tokens per packed row (4 sliding windows of 16)
    c.optimizer.learning_rate = 3e-3  # tiny models tolerate (and need) a high LR
    c.optimizer.warmup_steps = 20  # short warmup
    c.optimizer.weight_decay = 0.01  # little regularisation for a few hundred steps
    c.checkpoint.every_steps = 100  # three checkpoints over the run
    c.log_every = 10  # metrics every 10 steps
    c.eval_every = 100  # held-out loss every 100 steps
    c.eval_steps = 8  # 8 x 16 x 64 = 8k held-out tokens per eval
    return c
