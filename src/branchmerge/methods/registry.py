"""The merge methods' registry: :class:`MergeMethod`, ``@merge_method``, and how a parameter's setting (a
value, a gradient, filter rules) resolves for one tensor, as mergekit resolves them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor


class MethodParams(BaseModel):
    """Parameters of a merge method (none). Subclasses declare theirs; unknown keys are refused. Those named in
    ``per_model`` may also be given per model (mergekit's per-model ``parameters``); the method then gets a
    list of N values for them."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    per_model: ClassVar[frozenset[str]] = frozenset()


_SCALAR = (bool, int, float, str)


def evaluate_setting(setting: Any, tensor: str, t: float) -> Any:
    """A parameter's value for one tensor, as mergekit resolves its settings: a scalar; a list of numbers, a
    gradient interpolated at ``t`` (0 at the first layer, 1 at the last; embeddings and the head take 0);
    ``{filter, value}`` rules (or a list of them), the first whose ``filter`` is in the tensor's name (or is
    absent or ``*``) giving the value. None when no rule applies (the parameter's default then).

    Raises:
        ValueError: a setting of another shape.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALAR):
        return setting
    if not isinstance(setting, list):
        raise ValueError(f"a setting is a value, a list of values (a gradient) or {{filter, value}} rules, got "
                         f"{setting!r}")
    if not setting:
        return None
    if all(isinstance(e, _SCALAR) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for rule in setting:
        if not isinstance(rule, dict) or "value" not in rule or set(rule) - {"filter", "value"}:
            raise ValueError(f"a rule is {{filter: TEXT, value: SETTING}} (filter optional), got {rule!r}")
        f = rule.get("filter")
        if f is None or f == "*" or (tensor and isinstance(f, str) and f in tensor):
            return evaluate_setting(rule["value"], tensor, t)
    return None


def model_weight(setting: Any, tensor: str, t: float, default: float) -> float:
    """One model's ``weight`` setting (a value, a gradient or filter rules) for ``tensor``; ``default`` (the
    branch's weight) where no rule applies.

    Raises:
        ValueError: a weight that is not a number.
    """
    v = evaluate_setting(setting, tensor, t)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"a model's `weight` must be a number (or a gradient or rules of numbers), got {v!r}")
    return float(v)


def _filters(*settings: dict[str, Any]) -> set[str]:
    """Every ``filter`` the settings name, and "" (a tensor no filter matches)."""
    names: set[str] = {""}

    def walk(v: Any) -> None:
        for r in v if isinstance(v, list) else [v]:
            if isinstance(r, dict):
                if isinstance(r.get("filter"), str):
                    names.add(r["filter"])
                walk(r.get("value"))

    for data in settings:
        for v in data.values():
            walk(v)
    return names


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor] | None
    reference_url: str
    needs_base: bool
    description: str
    params: type[MethodParams] = MethodParams
    seeded: bool = False  # takes a ``generator`` (seeded per tensor by the orchestrator)
    pairwise: bool = False  # the base model and exactly one other (slerp)
    min_models: int = 1  # fine-tunes (besides the base) it needs
    max_models: int | None = None  # at most (nuslerp: two)
    optional_base: bool = False  # takes ``base`` when the config names one (nuslerp, multislerp)

    def check_settings(self, data: dict[str, Any], own: dict[str, Any] | None = None) -> None:
        """Validate a config's ``parameters:`` whose values may be mergekit settings (gradients, filters):
        each is resolved at the first, middle and last layer and under each of its filters, and validated.
        ``own``: one model's own parameters (its ``weight`` and this method's per-model ones), checked the
        same way over the shared ones.

        Raises:
            ValueError: naming the parameter at fault.
        """
        own = own or {}
        stray = set(own) - {"weight"} - self.params.per_model
        if stray:
            each = ", ".join(["weight", *sorted(self.params.per_model)])
            raise ValueError(f"method {self.name!r}: {', '.join(sorted(stray))} cannot differ per model (per model: "
                             f"{each}); set it under the merge's `parameters`")
        merged = {**data, **{k: v for k, v in own.items() if k != "weight"}}
        for tensor in _filters(merged, own):
            for t in (0.0, 0.5, 1.0):
                self.params_for(merged, tensor, t)
                if "weight" in own:
                    model_weight(own["weight"], tensor, t, 1.0)

    def model_params(self, data: dict[str, Any], own: list[dict[str, Any]], tensor: str, t: float) -> dict[str, Any]:
        """:meth:`params_for` when models give their own parameters (``own[i]``, ``weight`` aside): each model's
        are validated whole over the shared ones, and a per-model parameter whose values differ becomes the
        list of N values."""
        shared = self.params_for(data, tensor, t)
        mine = [{k: v for k, v in o.items() if k != "weight"} for o in own]
        if not any(mine):
            return shared
        each = [self.params_for({**data, **o}, tensor, t) if o else shared for o in mine]
        out = dict(shared)
        for k in self.params.per_model:
            values = [e[k] for e in each]
            out[k] = values if len(set(values)) > 1 else values[0]
        return out

    def params_for(self, data: dict[str, Any], tensor: str, t: float) -> dict[str, Any]:
        """The validated parameters of ``tensor`` at layer position ``t`` (see :func:`evaluate_setting`)."""
        try:
            values = {k: evaluate_setting(v, tensor, t) for k, v in data.items()}
        except ValueError as e:
            raise ValueError(f"method {self.name!r}: parameters: {e}") from None
        return self.parse_params({k: v for k, v in values.items() if v is not None}).model_dump()

    def parse_params(self, data: dict[str, Any]) -> MethodParams:
        """Validate a config's ``parameters:`` for this method.

        Raises:
            ValueError: naming the parameter at fault and the ones this method takes.
        """
        try:
            return self.params.model_validate(data)
        except ValidationError as e:
            known = ", ".join(f.alias or n for n, f in self.params.model_fields.items()) or "none"
            errs = "; ".join(f"parameters.{'.'.join(map(str, x['loc']))}: "
                             f"{'unknown parameter' if x['type'] == 'extra_forbidden' else x['msg']}"
                             for x in e.errors())
            raise ValueError(f"method {self.name!r}: {errs} (parameters it takes: {known})") from None


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, reference_url: str, needs_base: bool = False,
                 params: type[MethodParams] = MethodParams, seeded: bool = False, pairwise: bool = False,
                 min_models: int = 1, max_models: int | None = None, optional_base: bool = False):
    """Register a pure merge function ``fn(tensors, *, weights, [base], [generator], **params) -> Tensor``:
    ``tensors`` the N fine-tunes' tensors of one name (each of the same shape), ``weights`` their N
    weights, ``base`` the base model's tensor where the method takes one."""
    if not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise ValueError(f"merge method name {name!r} must be lower_snake_case")

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        summary = " ".join(ln.strip() for ln in (fn.__doc__ or "").strip().split("\n\n")[0].splitlines())
        METHODS[name] = MergeMethod(name, fn, reference_url, needs_base, summary, params, seeded,
                                    pairwise, min_models, max_models, optional_base)
        return fn

    return deco


METHODS["branch"] = MergeMethod(
    "branch",
    None,
    "https://llm-merging.github.io/ (NeurIPS 2024 LLM-Merging competition; Fang, Mo & Gao)",
    False,
    "Shared normalized average plus per-branch rSVD low-rank differences; keeps every model as a branch.",
)

