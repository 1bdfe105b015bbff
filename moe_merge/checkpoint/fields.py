"""Checked values of a loaded checkpoint file.

A checkpoint is input from someone else: every value its files hold about their layout is
checked for type and range before it is used, and a bad one is one :class:`CheckpointError`
line naming the file and the key. Each function takes the file's ``path`` (for the message
only, nothing is opened), the dotted ``key`` and the value, and returns the value checked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn

from moe_merge.checkpoint.discover import is_int, show_value
from moe_merge.checkpoint.safe_load import LazyTensor, Record
from moe_merge.errors import CheckpointError

MAX_RANKS = 1 << 20  # data-parallel / expert-parallel ranks
MAX_EXPERTS = 1 << 16  # experts of one MoE layer
MAX_NAME = 1024  # characters of a parameter name
MAX_NUMEL = 1 << 48  # elements of one parameter
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def bad(path: Path, key: str, value: Any, want: str) -> NoReturn:
    """Refuse ``value`` of ``key`` in ``path``: it is not ``want``."""
    raise CheckpointError(f"{path}: key '{key}' is {show_value(value)}, {want}")


def integer(path: Path, key: str, value: Any, lo: int = 0, hi: int = MAX_RANKS) -> int:
    """``value``, an integer in ``[lo, hi]`` (bools are not integers)."""
    if not is_int(value) or not lo <= value <= hi:
        bad(path, key, value, f"not an integer in [{lo}, {hi}]")
    return int(value)


def optional(path: Path, key: str, value: Any, kind: type | tuple, default: Any) -> Any:
    """``value`` (``default`` when None) if it is a ``kind``."""
    if value is None:
        return default
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(
            k.__name__ for k in kind)
        bad(path, key, value, f"not a {names}")
    return value


def name_ok(name: Any) -> bool:
    """A parameter name: text of at most :data:`MAX_NAME` printable characters."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isprintable()


def param_name(path: Path, key: str, name: Any) -> str:
    """``name``, a parameter name (see :func:`name_ok`)."""
    if not name_ok(name):
        bad(path, key, name, f"not a parameter name (text of at most {MAX_NAME} printable "
                             "characters)")
    return name


def shape(path: Path, key: str, value: Any) -> tuple[int, ...]:
    """``value``, a tensor shape: at most 32 sizes >= 0, at most :data:`MAX_NUMEL` elements."""
    if not isinstance(value, (tuple, list)) or len(value) > 32 \
            or not all(is_int(s) and 0 <= s <= MAX_NUMEL for s in value) \
            or math.prod(value) > MAX_NUMEL:
        bad(path, key, value, "not a tensor shape (at most 32 sizes >= 0)")
    return tuple(int(s) for s in value)


def param_shapes(path: Path, value: Any) -> list[dict[str, tuple[int, ...]]]:
    """``param_shapes``: per parameter group, parameter name -> shape."""
    if value is None:
        raise CheckpointError(f"{path}: key 'param_shapes' missing")
    if not isinstance(value, (list, tuple)):
        bad(path, "param_shapes", value, "not a list of parameter groups")
    out = []
    for g, group in enumerate(value):
        if not isinstance(group, dict):
            bad(path, f"param_shapes[{g}]", group, "not a dict of shapes")
        shapes = {}
        for name, s in group.items():
            param_name(path, f"param_shapes[{g}]", name)
            shapes[name] = shape(path, f"param_shapes[{g}].{name}", s)
        out.append(shapes)
    return out


def shape_of(path: Path, shapes: list[dict[str, tuple[int, ...]]], g: int, name: str
             ) -> tuple[int, ...]:
    """The shape of parameter ``name`` in group ``g`` of ``shapes``, the ``param_shapes`` of
    ``path``."""
    try:
        return shapes[g][name]
    except (TypeError, IndexError, KeyError):
        raise CheckpointError(f"{path}: no shape for parameter {name} in "
                              f"param_shapes[{g}]") from None


def optimizer_state(path: Path, state: dict) -> dict:
    """``optimizer_state_dict`` of the loaded optimizer file ``state``."""
    osd = state.get("optimizer_state_dict")
    if not isinstance(osd, dict):
        bad(path, "optimizer_state_dict", osd, "not a DeepSpeed optimizer state")
    return osd


def flat(path: Path, state: dict, key: tuple) -> LazyTensor:
    """The flat fp32 partition (or Adam moment) at ``key`` of the loaded file ``state``: a
    contiguous float32 tensor."""
    obj: Any = state
    try:
        for k in key:
            obj = obj[k]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: key {_dotted(key)} missing") from None
    if not isinstance(obj, LazyTensor):
        raise CheckpointError(f"{path}: {_dotted(key)} is {show_value(obj)}, not a tensor")
    if obj.dtype != "float32":
        raise CheckpointError(f"{path}: {_dotted(key)} is a tensor of {obj.dtype}; fp32 master "
                              "weights and moments are float32: refused")
    if not obj.is_contiguous():
        raise CheckpointError(f"{path}: {_dotted(key)} is not a contiguous tensor: not a flat "
                              "partition")
    return obj


def _dotted(key: tuple) -> str:
    return ".".join(map(str, key))


def module_tensor(path: Path, key: str, t: Any, want: tuple[int, ...]) -> LazyTensor:
    """``t``, the module weight ``key`` of ``path``: a floating-point tensor of shape
    ``want``."""
    if t is None:
        raise CheckpointError(f"{path}: module weight {key} missing")
    if not isinstance(t, LazyTensor):
        raise CheckpointError(f"{path}: module weight {key} is {show_value(t)}, not a tensor")
    if t.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{path}: module weight {key} is a tensor of {t.dtype}, not "
                              "floating-point weights: refused")
    if tuple(t.shape) != tuple(want):
        raise CheckpointError(f"{path}: module weight {key} has shape {list(t.shape)}, expected "
                              f"{list(want)}")
    return t


def check_views(path: Path, obj: Any) -> None:
    """Refuse tensors a DeepSpeed checkpoint never holds, whose values would not be their own:
    a non-contiguous tensor (an overlapping or strided view of its record), or two tensors whose
    bytes overlap (one parameter read through another's record). Views of one record at
    disjoint places are fine (ZeRO-1/2 module weights are views of one flat buffer), and so is
    the same view under two module names that the file's ``shared_params`` ties together."""
    shared = obj.get("shared_params") if isinstance(obj, dict) else None
    tied = {frozenset((f"module.{a}", f"module.{b}")) for a, b in shared.items()} \
        if isinstance(shared, dict) else set()
    views: dict[Record, dict[tuple, str]] = {}
    todo: list[tuple[Any, str]] = [(obj, "")]
    seen: set[int] = set()  # a container reached twice is walked once (the pickle may share)
    while todo:
        x, key = todo.pop()
        if isinstance(x, (dict, list, tuple)):
            if id(x) in seen:
                continue
            seen.add(id(x))
        if isinstance(x, dict):
            todo.extend((v, f"{key}.{k}" if key else str(k)) for k, v in x.items())
        elif isinstance(x, (list, tuple)):
            todo.extend((v, f"{key}.{i}") for i, v in enumerate(x))
        elif isinstance(x, LazyTensor) and x.numel():
            if not x.is_contiguous():
                raise CheckpointError(f"{path}: tensor {_short(key)} is a strided view of its "
                                      "record, not a contiguous tensor: refused")
            same = views.setdefault(x.record, {})
            view = (x.storage_offset, x.shape)
            if view in same and frozenset((same[view], key)) not in tied:
                raise CheckpointError(f"{path}: tensors {_short(same[view])} and {_short(key)} "
                                      f"share bytes of record {x.record.name}: refused")
            same.setdefault(view, key)
    for record, same in views.items():
        spans = sorted((off, off + math.prod(s), key) for (off, s), key in same.items())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointError(f"{path}: tensors {_short(a)} and {_short(b)} share bytes "
                                      f"of record {record.name}: refused")


def _short(key: str) -> str:
    return key if len(key) <= 120 else key[:117] + "..."
