"""Checkpoint dtypes: the names a checkpoint may be stored in, and numpy dtypes for them (bfloat16 via ml_dtypes)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def np_dtype(name: str | Any) -> np.dtype:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``np.float32`` -> numpy dtype (bfloat16 via ml_dtypes)."""
    if str(name) == "bfloat16" or name is jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    dt = np.dtype(name)
    if dt.name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not supported for checkpoints. Fix: use one of {DTYPE_NAMES}.")
    return dt


def dtype_name(dt: Any) -> str:
    dt = np_dtype(dt)
    return "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else dt.name
