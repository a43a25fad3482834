"""Pretrain Mistral / Mixtral: ``python train.py --config configs/tiny.py --workdir runs/tiny [--config.a.b=v]``.

Resumes from ``{workdir}/checkpoints`` when present. On SIGTERM / SIGINT it saves and exits with 128 + signal.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mistral_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, tokenizer)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.a.b=value for config overrides.")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger("mistral_jax").setLevel(logging.INFO)
    try:
        result = trainer.train(_CONFIG.value, _WORKDIR.value)
    except (trainer.ConfigError, FloatingPointError, ValueError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    logging.info("%s at step %d: %s", result["status"], result["step"], result["last_metrics"])
    if result["status"] == "preempted":
        sys.exit(128 + result["signal"])


if __name__ == "__main__":
    try:
        trainer.check_cli_overrides(sys.argv[1:])
    except trainer.ConfigError as e:
        sys.exit(f"ConfigError: {e}")
    app.run(main)
