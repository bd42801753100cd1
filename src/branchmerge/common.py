"""Leaf helpers shared by every stage: dtype names, JSON dumping, safe names, NaN/Inf counts. Imports nothing of ours
but :mod:`branchmerge.errors`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from branchmerge.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16", "f16": "float16",
            "half": "float16", "bf16": "bfloat16"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # branch, group and file names: no separators, no '..'


def dtype_name(value: str | torch.dtype | None, *, default: str | None = None, field: str = "dtype") -> str:
    """Canonical dtype name (``float32``, ``float16``, ``bfloat16``) from a name, an alias (``bf16``,
    ``fp16``, ``torch.float16``), a :class:`torch.dtype`, or ``None``/``"auto"`` (then ``default``).

    Raises:
        ConfigError: naming ``field`` and the values it accepts.
    """
    if isinstance(value, torch.dtype):
        for name, dt in DTYPES.items():
            if dt == value:
                return name
        raise ConfigError(f"`{field}` {value} is not supported; use one of {', '.join(DTYPES)}")
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        if default is None:
            raise ConfigError(f"`{field}` is 'auto' but there is nothing to take it from")
        return dtype_name(default, field=field)
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        key = _ALIASES.get(key, key)
        if key in DTYPES:
            return key
    raise ConfigError(f"`{field}` {value!r} is not a dtype; use float32, float16, bfloat16 (or fp32, fp16, bf16, auto)")


def resolve_dtype(value: str | torch.dtype | None, *, default: str | None = None, field: str = "dtype") -> torch.dtype:
    """:func:`dtype_name`, as a :class:`torch.dtype`."""
    return DTYPES[dtype_name(value, default=default, field=field)]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here.

    Raises:
        ConfigError: an unknown device string, or CUDA asked for where there is none.
    """
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a device (use cpu, cuda or cuda:N): {e}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available here; use device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if d.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return d


def nonfinite(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """How many NaN/Inf values a floating-point tensor holds (0 for other dtypes), counted in chunks of
    ``chunk`` elements so that the check needs little memory beside the tensor."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))


def json_dumps(obj: Any) -> str:
    """JSON as this project writes it: indented, key order kept."""
    return json.dumps(obj, indent=2)


def check_name(value: str, what: str) -> str:
    """``value`` if it is a safe single path component (letters, digits, ``_ . -``; not ``.``/``..``).

    Raises:
        ValueError: naming ``what``.
    """
    if not isinstance(value, str) or not SAFE_NAME.match(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a safe name: use letters, digits, '_', '-', '.', "
                         "not starting with a symbol")
    return value


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file.

    Raises:
        ConfigError: the file is missing, or names the line that is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{what} {path} line {i} is not valid JSON: {e.msg}") from None
