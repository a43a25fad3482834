"""Optax optimizer from the run config: AdamW, warmup + cosine / linear / constant, clipping, decay mask.

``config.optimizer`` fields (see ``configs/base.py``): ``learning_rate`` (peak), ``schedule``, ``warmup_steps``,
``min_lr_ratio``, ``b1``, ``b2``, ``eps``, ``weight_decay``, ``decay_norms``, ``decay_embeddings``,
``grad_clip_norm``. The decay horizon is ``config.num_steps``. ``check_config`` range-checks them (the trainer
calls it before anything slow).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def _number(opt_cfg: Any, name: str) -> float:
    value = opt_cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.optimizer.{name}={value!r} must be a finite number. "
                         f"Fix: set --config.optimizer.{name} to a number.")
    return float(value)


def check_config(opt_cfg: Any, num_steps: int | None = None) -> None:
    """Range-check ``config.optimizer`` (and ``warmup_steps <= num_steps`` when given); ValueError names the field,
    its value and the fix."""
    if opt_cfg.name != "adamw":
        raise ValueError(f"config.optimizer.name={opt_cfg.name!r} is unknown. Fix: use 'adamw'.")
    if opt_cfg.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r} is unknown. Fix: use one of {SCHEDULES}.")
    # (field, ok, rule, fix example)
    rules = [
        ("learning_rate", lambda v: v >= 0, "must be >= 0 (the peak step size)", "3e-4"),
        ("min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1] (final LR as a fraction of the peak)", "0.1"),
        ("b1", lambda v: 0 <= v < 1, "must be in [0, 1) (Adam's first-moment decay)", "0.9"),
        ("b2", lambda v: 0 <= v < 1, "must be in [0, 1) (Adam's second-moment decay)", "0.95"),
        ("eps", lambda v: v > 0, "must be > 0 (Adam's denominator guard)", "1e-8"),
        ("weight_decay", lambda v: v >= 0, "must be >= 0 (a negative decay grows the weights)", "0.1"),
        ("grad_clip_norm", lambda v: v >= 0, "must be >= 0 (0 = no clipping)", "1.0"),
    ]
    for name, ok, rule, example in rules:
        if name == "grad_clip_norm" and opt_cfg[name] is None:  # None = no clipping, as 0
            continue
        value = _number(opt_cfg, name)
        if not ok(value):
            raise ValueError(f"config.optimizer.{name}={opt_cfg[name]!r} {rule}. "
                             f"Fix: set e.g. --config.optimizer.{name}={example}.")
    warmup = opt_cfg.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"config.optimizer.warmup_steps={warmup!r} must be an integer >= 0. "
                         "Fix: set e.g. --config.optimizer.warmup_steps=100.")
    if num_steps is not None and warmup > num_steps and float(opt_cfg.learning_rate) > 0:  # lr 0: nothing to warm
        raise ValueError(f"config.optimizer.warmup_steps={warmup} is larger than config.num_steps={num_steps}: the "
                         "learning rate would never reach its peak. Fix: set --config.optimizer.warmup_steps="
                         f"{max(num_steps // 10, 0)} (or any value <= {num_steps}), or raise config.num_steps.")


def make_schedule(opt_cfg: Any, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine / linear decay to ``min_lr_ratio * lr``, or constant.

    Args:
      opt_cfg: the ``config.optimizer`` ConfigDict.
      num_steps: total optimizer steps (the decay ends there).

    Returns:
      An optax schedule ``step -> learning rate``.
    """
    lr, warmup = float(opt_cfg.learning_rate), int(opt_cfg.warmup_steps)
    end = lr * float(opt_cfg.min_lr_ratio)
    if opt_cfg.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r} is unknown. Fix: use one of {SCHEDULES}.")
    decay_steps = max(num_steps - warmup, 1)
    if opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params: Any, decay_norms: bool = False, decay_embeddings: bool = False) -> Any:
    """A pytree of bools (same structure as ``params``): True where weight decay applies.

    Norm scales (any path containing ``norm``) and the token embedding (``embed``) are excluded unless
    ``decay_norms`` / ``decay_embeddings``. Matched by name, not rank: stacked layer norms are 2-D.
    """

    def keep(path, _) -> bool:
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if not decay_norms and any("norm" in n for n in names):
            return False
        if not decay_embeddings and names and names[0] == "embed":
            return False
        return True

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt_cfg: Any, num_steps: int) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """``(tx, schedule)``: global-norm clipping then AdamW with the decay mask and the schedule.

    Args:
      opt_cfg: the ``config.optimizer`` ConfigDict.
      num_steps: total optimizer steps.
    """
    check_config(opt_cfg)
    schedule = make_schedule(opt_cfg, num_steps)
    parts = []
    if opt_cfg.grad_clip_norm and opt_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip_norm)))
    mask = lambda p: decay_mask(p, bool(opt_cfg.decay_norms), bool(opt_cfg.decay_embeddings))  # noqa: E731
    parts.append(optax.adamw(schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                             weight_decay=float(opt_cfg.weight_decay), mask=mask))
    return optax.chain(*parts), schedule
