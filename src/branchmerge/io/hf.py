"""Finishing a plain Hugging Face model folder: shard names, index, and ``config.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from branchmerge.common import json_dumps
from branchmerge.io.writer import ShardWriter


def finish_hf_shards(folder: Path, writer: ShardWriter) -> None:
    """Rename a closed writer's shards the HF way: one ``model.safetensors``, or numbered files plus an index."""
    names = sorted(writer.shards)
    if len(names) == 1:
        (folder / names[0]).rename(folder / "model.safetensors")
        return
    renames = {old: f"model-{i:05d}-of-{len(names):05d}.safetensors" for i, old in enumerate(names, 1)}
    for old, new in renames.items():
        (folder / old).rename(folder / new)
    index = {
        "metadata": {"total_size": writer.total_bytes},
        "weight_map": {k: renames[v] for k, v in writer.weight_map.items()},
    }
    (folder / "model.safetensors.index.json").write_text(json_dumps(index))


def write_hf_config(folder: Path, config: dict[str, Any], dtype: str) -> None:
    """Write ``config.json`` for dense weights of ``dtype``: no ``quantization_config`` (a GGUF import's)."""
    cfg = dict(config)
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (folder / "config.json").write_text(json_dumps(cfg))
