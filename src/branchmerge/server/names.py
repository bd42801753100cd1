"""Other names for served models (vLLM's ``--served-model-name``): a client that sends a hard-coded model name
(``gpt-4o``) reaches a branch, a pipeline or ``auto`` without being changed.

``--served-model-name NAME`` names what a bundle serves as a whole: ``auto`` when it has a router, else its one
model; ``NAME=MODEL`` names one of its models. Requests are read with the name replaced (answers name the
model that answered); ``/v1/models`` lists each name with the model it stands for as its ``root``.
"""

from __future__ import annotations

import re

from branchmerge.errors import ConfigError

_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")


def model_aliases(entries: list[str], model_ids: list[str]) -> dict[str, str]:
    """``{name: model}`` from ``--served-model-name`` entries (``NAME`` or ``NAME=MODEL``) over the served
    ``model_ids`` (branches, pipelines, ``auto``).

    Raises:
        ConfigError: a malformed name, one taken by a served model or given twice, a target that is not served,
            or a bare ``NAME`` where the bundle has several models and no router (naming the fix).
    """
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, target = entry.partition("=")
        name, target = name.strip(), target.strip()
        if not sep:
            if "auto" in model_ids:
                target = "auto"
            elif len(model_ids) == 1:
                target = model_ids[0]
            else:
                raise ConfigError(f"--served-model-name {name!r}: the bundle serves {', '.join(model_ids)} and has no "
                                  f"router, so a name alone cannot say which; give {name}=MODEL")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"--served-model-name {entry!r}: a name is 1 to 256 characters without spaces or "
                              "control characters")
        if name == "auto" or name in model_ids:
            raise ConfigError(f"--served-model-name {name!r} is already a served model's name")
        if target not in model_ids:
            raise ConfigError(f"--served-model-name {entry!r}: {target!r} is not served; models: {', '.join(model_ids)}")
        if out.get(name, target) != target:
            raise ConfigError(f"--served-model-name {name!r} is given for both {out[name]!r} and {target!r}")
        out[name] = target
    return out


def renamed(req, aliases: dict[str, str]):
    """``req`` (a request with a ``model``) with an alias replaced by the model it stands for."""
    target = aliases.get(getattr(req, "model", None) or "")
    return req if target is None else req.model_copy(update={"model": target})


def listed(listing: dict, aliases: dict[str, str]) -> dict:
    """``/v1/models``'s ``listing`` with an entry per alias: its model's, under the alias, ``root`` the model."""
    by_id = {m["id"]: m for m in listing["data"]}
    extra = [{**by_id[t], "id": a, "root": t} for a, t in aliases.items() if t in by_id]
    return {**listing, "data": [*listing["data"], *extra]}
