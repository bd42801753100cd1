"""Staged responses: stage 1 (a strong reasoner) answers, stage 2 rewrites the answer for clarity and
format without re-reasoning (the write-up's two-stage method).

    pipelines:
      - name: reason_then_format
        stages:
          - {branch: reasoner, user: "{question}", max_tokens: 256}
          - branch: general
            system: "Rewrite the answer. Output only the final answer."
            user: "Question: {question}\\nDraft answer: {previous}\\nFinal answer:"
            max_tokens: 32
            structured_outputs: {regex: "[0-9]+"}   # optional: the stage's answer follows it
    routes: {reasoner: reason_then_format}   # questions routed to `reasoner` run this pipeline

Every stage's output is returned, not only the last. A structure given with the request (a JSON schema,
regex, choice or grammar) constrains the last stage, the one that formats the answer: it replaces that stage's
own ``structured_outputs``, and that stage's ``stop`` and ``extract`` are not applied (they could break it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from branchmerge.config import read_yaml, validate
from branchmerge.errors import ConfigError
from branchmerge.runtime.sampling import RowSampler, RowSettings
from branchmerge.runtime.structured import Structure, StructureError
from branchmerge.runtime.text import cut_at_stop

if TYPE_CHECKING:
    from branchmerge.runtime.bundle import Bundle, GenerationResult

# ``generate(ids_list, branches, max_new_tokens, **sampling) -> [GenerationResult]``: the bundle's own
# ``generate_ids`` by default; the server passes its engine so that stages batch with other requests
Generate = Callable[..., "list[GenerationResult]"]

logger = logging.getLogger(__name__)
PIPELINES_FILE = "pipelines.yaml"
_FIELD_RE = re.compile(r"\{(\w+)\}")


class Stage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    branch: str = Field(default="auto", description="Branch that answers this stage, or 'auto'.")
    system: str | None = Field(default=None, description="System prompt template.")
    user: str = Field(default="{question}", description="User prompt template: {question}, {previous}.")
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)
    stop: list[str] = Field(default_factory=list)
    chat: bool | None = Field(default=None, description="Apply the chat template (default: when the tokenizer has one).")
    extract: str | None = Field(
        default=None, description="Regex applied to the output: its first match (group 1 if any) becomes the answer."
    )
    structured_outputs: dict[str, Any] | None = Field(
        default=None, description="The stage's answer follows this structure, as vLLM's `structured_outputs`: one "
        "of {json: SCHEMA}, {regex: PATTERN}, {choice: [..]}, {grammar: EBNF}, {json_object: true}.")

    @field_validator("structured_outputs")
    @classmethod
    def _structure(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            try:
                Structure.from_options(v).check()
            except StructureError as e:
                raise ValueError(str(e)) from None
        return v

    @property
    def structure(self) -> Structure | None:
        """The stage's own structure (checked when the config was read)."""
        return None if self.structured_outputs is None else Structure.from_options(self.structured_outputs)

    @field_validator("extract")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                regex.compile(v)
            except regex.error as e:
                raise ValueError(f"`extract` {v!r} is not a valid regular expression: {e}") from None
        return v

    @field_validator("user", "system")
    @classmethod
    def _fields(cls, v: str | None) -> str | None:
        if v is None:
            return v
        bad = sorted(set(_FIELD_RE.findall(v)) - {"question", "previous"})
        if bad:
            raise ValueError(f"unknown template field(s) {bad}; use {{question}} and {{previous}}")
        return v


class Pipeline(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    stages: list[Stage]

    @model_validator(mode="after")
    def _check(self) -> Pipeline:
        if not self.stages:
            raise ValueError(f"pipeline {self.name!r} has no stages")
        if "{previous}" in self.stages[0].user or "{previous}" in (self.stages[0].system or ""):
            raise ValueError(f"pipeline {self.name!r}: the first stage has no {{previous}} answer to use")
        return self


class PipelinesConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pipelines: list[Pipeline] = Field(default_factory=list)
    routes: dict[str, str] = Field(default_factory=dict, description="Routed branch → pipeline name.")

    @model_validator(mode="after")
    def _check(self) -> PipelinesConfig:
        names = [p.name for p in self.pipelines]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate pipeline name(s) {sorted(dup)}")
        for branch, p in self.routes.items():
            if p not in names:
                raise ValueError(f"routes: {branch!r} → unknown pipeline {p!r} (pipelines: {', '.join(names)})")
        return self

    def get(self, name: str) -> Pipeline | None:
        return next((p for p in self.pipelines if p.name == name), None)

    def check_branches(self, branches: list[str]) -> None:
        valid = set(branches) | {"auto"}
        for p in self.pipelines:
            for i, s in enumerate(p.stages):
                if s.branch not in valid:
                    raise ConfigError(f"pipeline {p.name!r} stage {i + 1}: unknown branch {s.branch!r} "
                                      f"(branches: {', '.join(branches)}, or auto)")
        for b in self.routes:
            if b not in branches:
                raise ConfigError(f"routes: {b!r} is not a branch ({', '.join(branches)})")
        clash = set(branches) & {p.name for p in self.pipelines}
        if clash:
            raise ConfigError(f"pipeline name(s) {sorted(clash)} clash with branch names")


def load_pipelines(path: str | Path) -> PipelinesConfig:
    return validate(PipelinesConfig, read_yaml(path, "pipelines file") or {}, str(path))


def bundle_pipelines(bundle: Bundle) -> PipelinesConfig:
    """The pipelines stored in ``BUNDLE/pipelines.yaml`` (none when absent)."""
    f = bundle.path / PIPELINES_FILE
    cfg = load_pipelines(f) if f.is_file() else PipelinesConfig()
    cfg.check_branches(bundle.branch_names)
    return cfg


@dataclass
class StageResult:
    stage: int
    branch: str
    prompt: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # "length": the stage ran out of max_tokens


EXTRACT_TIMEOUT_S = 1.0  # an ``extract`` pattern that backtracks catastrophically stops here


class ExtractTimeoutError(ConfigError):
    """A stage's ``extract`` regex ran past :data:`EXTRACT_TIMEOUT_S` on an output (an operator's config
    fault, not the client's)."""


def postprocess(text: str, stage: Stage, *, raw: bool = False) -> str:
    """A stage's output cut at its stop strings, stripped, and narrowed by its ``extract`` regex (``raw``:
    only stripped; a structured final answer is left as its structure made it).

    Raises:
        ExtractTimeoutError: the regex ran past :data:`EXTRACT_TIMEOUT_S` (Python's ``re`` has no time
            limit, so a pattern such as ``(a+)+$`` could hold a thread for ever; ``regex`` stops it).
    """
    if raw:
        return text.strip()
    text = cut_at_stop(text, stage.stop)[0].strip()
    if stage.extract:
        try:
            m = regex.search(stage.extract, text, timeout=EXTRACT_TIMEOUT_S, concurrent=True)  # GIL released
        except TimeoutError:
            raise ExtractTimeoutError(
                f"the stage's `extract` regex {stage.extract!r} ran past {EXTRACT_TIMEOUT_S:g} s on a "
                f"{len(text)}-character output; simplify it in the pipelines file") from None
        if m:
            text = m.group(1) if m.re.groups else m.group(0)
    return text


_SLOT = re.compile(r"\{(question|previous)\}")


def fill(template: str, question: str, previous: str) -> str:
    """``template`` with ``{question}`` and ``{previous}`` filled in one pass: a question that itself
    contains ``{previous}`` is left as written."""
    return _SLOT.sub(lambda m: question if m.group(1) == "question" else previous, template)


@dataclass
class StageBatch:
    """What one stage asks to generate: a (mixed-branch) batch, one row per question."""

    stage: int
    ids: list[list[int]]
    branches: list[str]
    max_new_tokens: int
    temperature: float  # 0: greedy
    stop: list[str]  # each row ends once its text holds one
    structure: Structure | None = None  # each row's answer follows it


def pipeline_steps(bundle: Bundle, pipeline: Pipeline, questions: list[str], structure: Structure | None = None
                   ) -> Generator[StageBatch, list[GenerationResult], list[list[StageResult]]]:
    """A pipeline as steps: yields each stage's :class:`StageBatch` and is sent back its generations; returns,
    per question, the result of each stage in order. The caller decides how a batch is generated and when
    (:func:`run_pipeline` at once; the server through its engine, without holding a thread while it waits).
    Routing (``auto`` stages) and encoding happen inside the step, so a caller may run steps off its loop.
    ``structure``: the final answer's (the last stage's, in place of its own; its stop and extract left out)."""
    results: list[list[StageResult]] = [[] for _ in questions]
    previous = [""] * len(questions)
    for k, stage in enumerate(pipeline.stages, 1):
        prompts = [fill(stage.user, q, p) for q, p in zip(questions, previous)]
        system = stage.system
        branches = bundle.resolve_branches(questions if stage.branch == "auto" else prompts, stage.branch)
        ids = [bundle.encode(p, b, chat=stage.chat,
                             system=fill(system, q, prev) if system else None)
               for p, b, q, prev in zip(prompts, branches, questions, previous)]
        for i, b in zip(ids, branches):
            bundle.check_context(b, len(i), stage.max_tokens)
        given = structure is not None and k == len(pipeline.stages)
        outs = yield StageBatch(k, ids, branches, stage.max_tokens, stage.temperature,
                                [] if given else list(stage.stop), structure if given else stage.structure)
        for r, (o, prompt) in enumerate(zip(outs, prompts)):
            text = postprocess(o.text, stage, raw=given)
            results[r].append(StageResult(k, o.branch, prompt, text, len(o.prompt_ids), len(o.new_ids),
                                          o.finish_reason))
            previous[r] = text
    return results


def run_pipeline(bundle: Bundle, pipeline: Pipeline, questions: list[str], *,
                 generate: Generate | None = None, structure: Structure | None = None) -> list[list[StageResult]]:
    """Run every stage for all questions; each stage is one (mixed-branch) batch.

    Args:
        generate: how a stage's batch is generated (default ``bundle.generate_ids``; called as it is, with
            ``max_new_tokens``, ``stop`` and ``row_sampler``).
        structure: the final answers' (see :func:`pipeline_steps`).

    Returns:
        per question, the result of each stage in order (the last is the final answer).
    """
    gen = generate or bundle.generate_ids
    steps = pipeline_steps(bundle, pipeline, questions, structure)
    try:
        batch = next(steps)
        while True:
            n = len(batch.ids)  # sampled as the server samples a stage's rows
            settings = RowSettings(batch.temperature, structure=batch.structure)
            batch = steps.send(gen(batch.ids, batch.branches, max_new_tokens=batch.max_new_tokens,
                                   stop=[batch.stop] * n, row_sampler=RowSampler([settings] * n, bundle.device)))
    except StopIteration as done:
        return done.value


def answer(bundle: Bundle, questions: list[str], *, pipeline: str | None = None, branch: str = "auto",
           max_tokens: int | None = None, pipelines: PipelinesConfig | None = None, structure: Structure | None = None,
           **generation: Any) -> list[list[StageResult]]:
    """Answer questions with a named pipeline, or with ``branch`` (routing rules may send a routed
    branch to its pipeline). Every stage's result is returned. ``structure``: every final answer's (a
    pipeline's last stage; a branch's answer, greedy)."""
    cfg = pipelines if pipelines is not None else bundle_pipelines(bundle)
    if pipeline is not None:
        p = cfg.get(pipeline)
        if p is None:
            raise ConfigError(f"unknown pipeline {pipeline!r}; pipelines: {', '.join(x.name for x in cfg.pipelines) or 'none'}")
        return run_pipeline(bundle, p, questions, structure=structure)
    routed = bundle.resolve_branches(questions, branch)
    out: list[list[StageResult] | None] = [None] * len(questions)
    by_pipe: dict[str, list[int]] = {}
    single: list[int] = []
    for i, b in enumerate(routed):
        (by_pipe.setdefault(cfg.routes[b], []) if b in cfg.routes and branch == "auto" else single).append(i)
    for name, idx in by_pipe.items():
        for i, r in zip(idx, run_pipeline(bundle, cfg.get(name), [questions[i] for i in idx], structure=structure)):
            out[i] = r
    if single:
        ids = [bundle.encode(questions[i], routed[i]) for i in single]
        mt = bundle.fit_max_new_tokens(ids, [routed[i] for i in single], max_tokens)
        if structure is not None:
            generation["row_sampler"] = RowSampler([RowSettings(structure=structure)] * len(ids), bundle.device)
        gens = bundle.generate_ids(ids, [routed[i] for i in single], max_new_tokens=mt, **generation)
        for i, g in zip(single, gens):
            out[i] = [StageResult(1, g.branch, questions[i], g.text.strip(), len(g.prompt_ids), len(g.new_ids),
                                  g.finish_reason)]
    return [o for o in out if o is not None]
