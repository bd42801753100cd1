"""Several merges that feed one another, from one YAML file (``mergekit-multimerge``'s format): each YAML
document is a merge config, named with ``name:`` (an intermediate, written to ``INTERMEDIATE/NAME``) or
unnamed (the final merge, written to ``--out``). A model field (``model``, ``base_model``, ``base``,
``source_model``, ``tokenizer_source``) whose value is another document's name reads that merge's output,
so merges run in dependency order: a TIES merge of two code fine-tunes can become one branch of a bundle.

Each merge's inputs are fingerprinted (its config with names resolved, and its inputs' fingerprints); a
merge whose output exists with the same fingerprint is skipped (``lazy``), one whose config or inputs
changed is rebuilt. Fingerprints live in ``INTERMEDIATE/.stages/``, never inside an output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from branchmerge.config import MergeConfig, parse_config, safe_load_all
from branchmerge.errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_KEYS = ("model", "base_model", "base", "source_model", "tokenizer_source")
_KEYWORDS = {"tokenizer_source": ("union", "base")}  # values of these keys that name no model
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_DOCUMENTS = 256
FINAL = "(final)"


@dataclass
class Stage:
    """One merge of the file: its name (``None`` for the final one), its config (names resolved to folders),
    the names it reads, where it writes and its fingerprint."""

    name: str | None
    index: int
    config: MergeConfig
    needs: set[str] = field(default_factory=set)
    out: Path | None = None  # (None only while planning a final merge without --out)
    fingerprint: str = ""

    @property
    def label(self) -> str:
        return self.name if self.name is not None else FINAL


def _documents(path: Path) -> list[Any]:
    if not path.is_file():
        raise ConfigError(f"multimerge config {path} does not exist")
    try:
        docs = safe_load_all(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"multimerge config {path} is not valid YAML: {e}") from None
    if not docs:
        raise ConfigError(f"multimerge config {path} holds no merge")
    if len(docs) > MAX_DOCUMENTS:
        raise ConfigError(f"multimerge config {path} holds {len(docs)} merges; at most {MAX_DOCUMENTS}")
    return docs


def _patch(value: Any, names: dict[str, Path], used: set[str], key: str | None = None) -> Any:
    """``value`` with every model field naming a merge replaced by that merge's folder (names put in ``used``)."""
    if isinstance(value, dict):
        return {k: _patch(v, names, used, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_patch(v, names, used, key) for v in value]
    if (isinstance(value, str) and key in MODEL_KEYS and value in names
            and value not in _KEYWORDS.get(key, ())):
        used.add(value)
        return str(names[value])
    return value


def plan(path: str | Path, intermediate: str | Path, out: str | Path | None,
         adjust: Callable[[MergeConfig], MergeConfig] | None = None) -> list[Stage]:
    """The merges of the file at ``path`` in the order they run, each config validated (then passed through
    ``adjust``, e.g. the command line's device or seed, which the fingerprints include).

    Raises:
        ConfigError: a document that is not a merge config (naming it and the field), a bad or repeated
            name, more than one unnamed merge, an unnamed merge without ``out`` (or ``out`` without one),
            merges that read each other in a cycle, or a bundle read as a model.
    """
    path = Path(path)
    inter = Path(intermediate).expanduser().resolve()
    docs = _documents(path)
    named: dict[str, int] = {}
    final: int | None = None
    for i, doc in enumerate(docs):
        where = f"{path} document {i + 1}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a merge config (a mapping), got {type(doc).__name__}")
        name = doc.get("name")
        if name is None:
            if final is not None:
                raise ConfigError(f"{where}: a second merge without a name; only the final merge is unnamed "
                                  f"(document {final + 1} is)")
            final = i
        elif not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(f"{where}: name {name!r} must be a folder name: letters, digits, '_', '-', '.' "
                              "(100 at most, not starting with '.', '_' or '-')")
        elif name in named:
            raise ConfigError(f"{where}: name {name!r} is already document {named[name] + 1}'s")
        else:
            named[name] = i
    folders = {n: inter / n for n in named}
    stages: dict[str | None, Stage] = {}
    for i, doc in enumerate(docs):
        name = doc.get("name")
        used: set[str] = set()
        data = _patch({k: v for k, v in doc.items() if k != "name"}, folders, used)
        where = f"{path} document {i + 1}" + (f" ({name})" if name else "")
        cfg = parse_config(data, where).resolve_paths(path.parent)
        if adjust is not None:
            cfg = adjust(cfg)
        target = folders[name] if name else None if out is None else Path(out).expanduser().resolve()
        st = Stage(name, i, cfg, used, target)
        if name in used:
            raise ConfigError(f"{where} reads its own output")
        stages[name] = st
    for st in stages.values():
        for n in sorted(st.needs):
            if stages[n].config.method == "branch":
                raise ConfigError(f"merge {st.label} reads {n!r}, which is a bundle (method branch): a merge reads "
                                  f"plain models; make {n!r} a baseline merge, or merge its models as branches here")
    order = _order(stages)
    if final is not None and out is None:
        raise ConfigError(f"{path} document {final + 1} has no name: it is the final merge, so give --out")
    if final is None and out is not None:
        raise ConfigError(f"{path}: every merge is named (each goes to the intermediate folder); --out is for "
                          "an unnamed final merge")
    target = stages[None].out if final is not None else None
    if target is not None and (target == inter or inter in target.parents or target in inter.parents):
        raise ConfigError(f"--out {out} and the intermediate folder {inter} overlap; give them separate folders")
    for st in order:
        blob = json.dumps({"config": st.config.model_dump(mode="json"), "out": str(st.out),
                           "inputs": {n: stages[n].fingerprint for n in sorted(st.needs)}}, sort_keys=True)
        st.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
    return order


def _order(stages: dict[str | None, Stage]) -> list[Stage]:
    """The stages in dependency order (file order among equals).

    Raises:
        ConfigError: a cycle, named merge by merge.
    """
    done: list[Stage] = []
    state: dict[str | None, int] = {}  # 1: being visited, 2: done

    def visit(st: Stage, trail: list[str]) -> None:
        if state.get(st.name) == 2:
            return
        if state.get(st.name) == 1:
            cycle = trail[trail.index(st.label):] + [st.label]
            raise ConfigError("merges read each other in a cycle: " + " → ".join(cycle))
        state[st.name] = 1
        for n in sorted(st.needs, key=lambda n: stages[n].index):
            visit(stages[n], trail + [st.label])
        state[st.name] = 2
        done.append(st)

    for st in sorted(stages.values(), key=lambda s: s.index):
        visit(st, [])
    return done


def _stamp(intermediate: Path, st: Stage) -> Path:
    return intermediate / ".stages" / f"{st.name or '_final'}.json"


def up_to_date(intermediate: str | Path, st: Stage) -> bool:
    """Whether ``st``'s output exists and was built from the same config and inputs."""
    stamp = _stamp(Path(intermediate).expanduser().resolve(), st)
    try:
        rec = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(rec, dict) and rec.get("fingerprint") == st.fingerprint and st.out is not None
            and st.out.is_dir() and rec.get("out") == str(st.out))


def to_build(stages: list[Stage], intermediate: str | Path, *, lazy: bool = True) -> set[str | None]:
    """The names of the merges that must run: all without ``lazy``; else those not up to date, and every merge
    that reads one of them."""
    todo: set[str | None] = set()
    for st in stages:
        if not lazy or st.needs & todo or not up_to_date(intermediate, st):
            todo.add(st.name)
    return todo


def run_multimerge(path: str | Path, intermediate: str | Path, out: str | Path | None = None, *, lazy: bool = True,
                   force: bool = False, progress: bool = True, model_card: bool = True,
                   adjust: Callable[[MergeConfig], MergeConfig] | None = None) -> list[dict[str, Any]]:
    """Run the merges of ``path`` in order; returns one record per merge (name, out, ``built`` or ``skipped``).

    Intermediates are replaced when stale (they are this command's own outputs); the final ``out`` only with
    ``force``, as ``merge`` does. A failed merge leaves the ones before it in place and writes nothing of its own.
    """
    from branchmerge.merge import run_merge

    inter = Path(intermediate).expanduser().resolve()
    stages = plan(path, inter, out, adjust)
    todo = to_build(stages, inter, lazy=lazy)
    (inter / ".stages").mkdir(parents=True, exist_ok=True)
    report = []
    for n, st in enumerate(stages, 1):
        assert st.out is not None
        if st.name not in todo:
            logger.info("[%d/%d] %s: up to date (%s)", n, len(stages), st.label, st.out)
            report.append({"name": st.label, "out": str(st.out), "status": "skipped"})
            continue
        logger.info("[%d/%d] %s: %s merge of %d models → %s", n, len(stages), st.label, st.config.method,
                    len(st.config.branches), st.out)
        stamp = _stamp(inter, st)
        stamp.unlink(missing_ok=True)
        replace = force if st.name is None else True
        run_merge(st.config, st.out, force=replace and st.out.exists(), progress=progress, model_card=model_card)
        stamp.write_text(json.dumps({"fingerprint": st.fingerprint, "out": str(st.out)}))
        report.append({"name": st.label, "out": str(st.out), "status": "built", "method": st.config.method})
    return report
