"""`select.yaml`: the candidates, the tasks that measure them, the memory budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from branchmerge.common import check_name, dtype_name
from branchmerge.config import read_yaml, validate


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CandidateSpec(_Frozen):
    name: str
    model: str = Field(description="HF folder, GGUF file (imported once), or PEFT LoRA adapter folder (a fine-tune: "
                                   "`role: finetune` with `base` naming the candidate it was trained on).")
    role: Literal["base", "finetune", "other"] = "other"
    base: str | None = Field(default=None, description="For a fine-tune: the name of its base candidate.")
    domain: str | None = Field(default=None, description="What it was tuned for (reported; the choice goes by "
                               "measured accuracy, and a branch answers the domains it is best at).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "candidate name")


class TaskSpec(_Frozen):
    name: str
    domain: str | None = Field(default=None, description="What the task measures (default: its name).")
    lm_eval: str | None = Field(default=None, description="An lm_eval task name.")
    path: str | None = Field(default=None, description="A local JSONL of items (see branchmerge.selection.tasks).")
    kind: Literal["multiple_choice", "generate"] = "multiple_choice"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "task name")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if (self.lm_eval is None) == (self.path is None):
            raise ValueError(f"task {self.name!r}: give exactly one of `lm_eval` (a task name) or `path` (a JSONL)")
        return self

    @property
    def area(self) -> str:
        return self.domain or self.name


class SelectConfig(_Frozen):
    candidates: list[CandidateSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    budget_gb: float = Field(gt=0, description="Memory for the bundle's weights plus kv_headroom_gb.")
    kv_headroom_gb: float = Field(default=0.0, ge=0, description="Kept free for activations and KV cache.")
    device: str = "cpu"
    dtype: str = "bfloat16"
    compress_rates: list[float] = Field(default_factory=lambda: [0.9, 0.95, 0.99], min_length=1)
    limit: int | None = Field(default=50, ge=1, description="Items per task evaluated (lm_eval's limit).")
    dev_items: int = Field(default=16, ge=1, description="Leading items of an unsplit local task kept for routing.")
    samples_per_branch: int = Field(default=4, ge=1, description="Router samples per chosen branch when no "
                                    "routing curve can be measured (fewer than two branches with dev items).")
    router_counts: list[int] = Field(default_factory=lambda: [1, 4, 16, 64], min_length=1,
                                     description="Samples per branch tried for the routing curve.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> str:
        return dtype_name(v, default="bfloat16")

    @field_validator("compress_rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0.0 <= r <= 1.0]
        if bad:
            raise ValueError(f"compress rates must be in [0, 1], got {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SelectConfig:
        names = [c.name for c in self.candidates]
        dup = {n for n in names if names.count(n) > 1} | {t.name for t in self.tasks if
                                                          [x.name for x in self.tasks].count(t.name) > 1}
        if dup:
            raise ValueError(f"duplicate name(s) {sorted(dup)}")
        bases = {c.name for c in self.candidates if c.role == "base"}
        for c in self.candidates:
            if c.role == "finetune" and c.base not in bases:
                raise ValueError(f"candidate {c.name!r} is a fine-tune of {c.base!r}, which is not a candidate "
                                 f"with role base (bases: {', '.join(sorted(bases)) or 'none'})")
            if c.role != "finetune" and c.base is not None:
                raise ValueError(f"candidate {c.name!r}: `base` is only for role finetune")
        return self

    def resolve_paths(self, base: Path) -> SelectConfig:
        def fix(p: str) -> str:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q).resolve())

        return self.model_copy(update={
            "candidates": [c.model_copy(update={"model": fix(c.model)}) for c in self.candidates],
            "tasks": [t.model_copy(update={"path": fix(t.path)}) if t.path else t for t in self.tasks]})


def load_select_config(path: str | Path, **overrides: Any) -> SelectConfig:
    path = Path(path)
    data = read_yaml(path, "select config")
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return validate(SelectConfig, data, str(path)).resolve_paths(path.parent)
