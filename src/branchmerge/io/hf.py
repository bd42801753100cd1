"""Finishing a plain Hugging Face model folder: shard names, index, ``config.json``, and a merge's chat
template."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from branchmerge.common import json_dumps
from branchmerge.config import CHAT_TEMPLATES
from branchmerge.errors import ConfigError
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


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s), if any."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    try:
        t = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    except (ValueError, AttributeError):
        return None
    return t if isinstance(t, str) else None


MAX_TEMPLATE_BYTES = 256 << 10  # a chat template file read for --chat-template


def chat_template_text(setting: str, where: str = "--chat-template") -> str:
    """The Jinja text of a chat-template setting (vLLM's ``--chat-template``): a packaged name
    (:data:`CHAT_TEMPLATES`), a file's path, or the template itself (text with ``{{`` or ``{%``).

    Raises:
        ConfigError: none of these (named with ``where``), or a file over :data:`MAX_TEMPLATE_BYTES`.
    """
    if setting in CHAT_TEMPLATES:
        return (resources.files("branchmerge") / "_data" / "chat_templates" / f"{setting}.jinja").read_text()
    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting)
    if not path.is_file():
        raise ConfigError(f"{where}: {setting[:80]!r} is not a file, a packaged template "
                          f"({', '.join(CHAT_TEMPLATES)}) or a Jinja template")
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise ConfigError(f"{where}: {path} has over {MAX_TEMPLATE_BYTES >> 10} KiB; a chat template is smaller")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None


def write_chat_template(folder: Path, setting: str, models: list[Path]) -> str:
    """Give the tokenizer in ``folder`` the chat template ``setting`` (mergekit's ``chat_template``): ``auto``
    (the one most of ``models`` have), a packaged name (:data:`CHAT_TEMPLATES`) or Jinja text. Written as
    ``chat_template.jinja``, taking the place of any other. Returns the template.

    Raises:
        ConfigError: ``auto`` with no model that has one.
    """
    if setting == "auto":
        found = [t for t in (model_chat_template(m) for m in models) if t]
        if not found:
            raise ConfigError("chat_template: auto, but none of the models has a chat template")
        template = Counter(found).most_common(1)[0][0]
    elif setting in CHAT_TEMPLATES:
        template = chat_template_text(setting)
    else:
        template = setting
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and "chat_template" in data:
            del data["chat_template"]
            cfg.write_text(json.dumps(data, indent=2))
    (folder / "chat_template.json").unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(template)
    return template
