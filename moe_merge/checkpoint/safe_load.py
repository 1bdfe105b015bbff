"""Load DeepSpeed checkpoint files without running code from them.

``torch.load(weights_only=True)`` refuses every pickle global that is not a tensor or plain
container. DeepSpeed's optimizer files carry three small objects; we allow them by name and map
each to an inert stand-in defined here, so no DeepSpeed class is imported or called and a
checkpoint crafted to run code is refused by torch's restricted unpickler. Files are mapped
(``mmap=True``): only the tensor records actually sliced are read from disk.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or merged; the message is one line naming the file."""


class ZeroStage(int):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""


class FragmentAddress:
    """Stand-in for deepspeed.utils.tensor_fragment.fragment_address: ``start``, ``numel``."""

    start: int
    numel: int


class LossScaler:
    """Stand-in for deepspeed.runtime.fp16.loss_scaler.LossScaler (state only)."""


ALLOWED_GLOBALS = [
    (ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
]


def load(path: Path | str, mmap: bool = True) -> dict[str, Any]:
    """Load one checkpoint file with torch's restricted unpickler and our allowlist."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise CheckpointError(f"{path}: refused, the file asks to run code or build objects "
                                  f"that a checkpoint does not need ({_unsupported(e) or first})"
                                  ) from None
        raise CheckpointError(f"{path}: cannot be read ({first})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupted ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint file (holds a "
                              f"{type(obj).__name__}, not a dict)")
    return obj


def _unsupported(e: Exception) -> str:
    for line in str(e).splitlines():
        if "Unsupported global" in line:
            return line.strip().rstrip(".")[:160]
    return ""
