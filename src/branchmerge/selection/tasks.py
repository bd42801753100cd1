"""Evaluation tasks for model selection: lm_eval task names, or local JSONL files turned into lm_eval tasks
(no YAML for the user to write), with held-apart dev items for router samples.

A local multiple-choice line is ``{"question": str, "choices": [str, ...], "answer": int}``; a generation
line ``{"question": str, "answer": str}``. A line may say ``"split": "dev"`` (router samples, never
evaluated) or ``"test"``; without any, the first ``dev_items`` lines are dev.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchmerge.common import read_jsonl
from branchmerge.errors import ConfigError


@dataclass
class LocalTask:
    name: str
    kind: str  # "multiple_choice" or "generate"
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]


def read_local_task(name: str, path: str | Path, kind: str, dev_items: int) -> LocalTask:
    """Read and check a task file.

    Raises:
        ConfigError: the file is missing, or a line (named by number) is malformed.
    """
    rows = []
    for i, row in read_jsonl(path, f"task {name!r}: file"):
        _check_row(row, kind, f"task {name!r}: {path} line {i}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"task {name!r}: {path} has no items")
    if any("split" in r for r in rows):
        dev = [r for r in rows if r.get("split") == "dev"]
        test = [r for r in rows if r.get("split") != "dev"]
    else:
        dev, test = rows[:dev_items], rows[dev_items:]
    if not test:
        raise ConfigError(f"task {name!r}: {path} leaves no items to evaluate after {len(dev)} dev items")
    return LocalTask(name, kind, dev, test)


def _check_row(row: Any, kind: str, where: str) -> None:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise ConfigError(f"{where}: `question` must be a non-empty string")
    if kind == "multiple_choice":
        ch, a = row.get("choices"), row.get("answer")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise ConfigError(f"{where}: `choices` must list at least two strings")
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
            raise ConfigError(f"{where}: `answer` must be the index of the right choice (0..{len(ch) - 1}), got {a!r}")
    elif not isinstance(row.get("answer"), str):
        raise ConfigError(f"{where}: `answer` must be a string")


def write_lm_eval_task(task: LocalTask, folder: Path) -> str:
    """Write ``task``'s evaluated items and an lm_eval task YAML into ``folder``; returns the task name."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task.name}.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n" for r in task.test))
    head = (f"task: {task.name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {json.dumps(str(data))}\n"
            "test_split: train\ndoc_to_text: '{{question}}'\n")
    if task.kind == "multiple_choice":
        body = ("output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    else:
        body = ("output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
                "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 32\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                "    ignore_case: true\n    ignore_punctuation: true\n    regexes_to_ignore: ['^ +', ' +$']\n")
    (folder / f"{task.name}.yaml").write_text(head + body)
    return task.name
