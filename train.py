"""Pretrain or fine-tune Mistral / Mixtral: ``python train.py --config configs/tiny.py --workdir runs/tiny``.

Flags: ``--config FILE [--config.a.b=value ...] --workdir DIR [--dry_run] [--verbose]``. The command line lives in
``mistral_jax.cli.train`` (also installed as ``mistral-jax-train``); see its docstring and the README.
"""

from mistral_jax.cli.train import entry

if __name__ == "__main__":
    entry()
