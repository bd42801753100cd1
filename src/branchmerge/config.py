"""Merge configuration: validated, frozen pydantic models read from YAML (mergekit-style).

Example::

    branches:
      - {name: general, model: ./models/instruct}
      - {name: medical, model: ./models/med}
      - {name: reasoner, model: ./models/other-arch, standalone: true}
      - {name: legal, model: ./adapters/legal-lora, base: ./models/instruct}   # a PEFT LoRA adapter
    compress_rate: 0.95
    compress_overrides:
      - {pattern: "*.mlp.down_proj.weight", compress_rate: 0.9}
    # or, instead of compress_rate/compress_overrides, a byte budget allocated across tensors:
    #   budget: {branch_bytes: 0.05}      # each branch ≤ 5% of its dense size (or total_bytes: 2GB)
    factor_bits: 16                    # 16 (the dtype), 8, 4, or mixed (8-bit top triplets, 4-bit tail)
    group_size: 64                     # entries per quantization scale
    rsvd: {oversample: 10, n_iter: 2, seed: 0}
    lora: exact                        # adapters of one base keep their own factors (or merged: compress them)
    dtype: bfloat16
    device: cpu
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from branchmerge.common import dtype_name
from branchmerge.errors import ConfigError
from branchmerge.methods import METHODS

DType = Literal["float32", "float16", "bfloat16"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BranchConfig(_Frozen):
    """One input model that becomes a branch of the bundle."""

    name: str = Field(description="Branch name, used to select it at inference time.")
    model: str = Field(description="Local Hugging Face folder (or a hub id where a hub is reachable).")
    standalone: bool = Field(
        default=False, description="Keep the model whole as its own branch (any architecture)."
    )
    group: str | None = Field(
        default=None,
        description="Compression group; defaults to 'main'. Branches in one group must share architecture.",
    )
    revision: str | None = Field(default=None, description="Hub revision when `model` is a hub id.")
    base: str | None = Field(
        default=None,
        description="When `model` is a PEFT LoRA adapter folder: the model it was trained on (defaults to the "
                    "config's `base_model`, then to the adapter's base_model_name_or_path when that is a hub id). "
                    "`model: BASE+ADAPTER` (mergekit's form) sets both.")

    def model_and_base(self) -> tuple[str, str | None]:
        """``(model, base)``, mergekit's ``model: BASE+ADAPTER`` read as two paths when ``model`` itself is not
        a path that exists (a folder may have a '+' in its name) and no ``base`` is given."""
        return split_plus(self.model) if self.base is None else (self.model, self.base)

    @field_validator("group")
    @classmethod
    def _valid_group(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.match(v):
            raise ValueError(f"group name {v!r} is invalid: use letters, digits, '_', '-', '.'")
        return v
    weight: float = Field(default=1.0, description="Weight of this model in baseline methods (linear, ties…).")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="This model's own baseline-method parameters (mergekit's per-model `parameters`): `weight` "
                    "and the method's per-model ones (`density`, `gamma`, `epsilon`), each a value, a gradient or "
                    "filter rules; they override the merge's `parameters` for this model.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v == "auto":
            raise ValueError(
                f"branch name {v!r} is invalid: use letters, digits, '_', '-', '.', not starting with a "
                "symbol, and not the reserved word 'auto'"
            )
        return v

    @property
    def group_name(self) -> str:
        return self.name if self.standalone else (self.group or "main")


def split_plus(model: str, root: Path | None = None) -> tuple[str, str | None]:
    """``"BASE+ADAPTER"`` → ``(ADAPTER, BASE)`` when ``model`` (under ``root``, else the current folder) does
    not exist as it is written and both parts are given; else ``(model, None)``."""
    p = Path(model).expanduser()
    if "+" not in model or (p if p.is_absolute() or root is None else root / p).exists():
        return model, None
    base, _, adapter = model.rpartition("+")
    return (adapter, base) if base and adapter else (model, None)


class RSVDConfig(_Frozen):
    """Randomized SVD settings (Halko, Martinsson & Tropp 2011)."""

    oversample: int = Field(default=10, ge=0, description="Extra random directions beyond the rank.")
    n_iter: int = Field(default=2, ge=0, description="Power iterations; more is slower and more accurate.")
    seed: int = Field(default=0, description="Seed of the random test matrix; merges are reproducible.")


class CompressOverride(_Frozen):
    """Per-tensor compress rate, selected by a glob pattern on the tensor name."""

    pattern: str
    compress_rate: float

    @field_validator("compress_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        return _check_rate(v, "compress_overrides[].compress_rate")


def _check_rate(v: float, field: str) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"`{field}` must be in [0, 1], got {v}")
    return v


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(v: Any, field: str) -> int:
    """``1500000``, ``"1.5MB"``, ``"2 GiB"`` → bytes.

    Raises:
        ValueError: naming ``field`` and the value.
    """
    if isinstance(v, bool):
        raise ValueError(f"`{field}` must be a size such as 2GB or 1500000, got {v!r}")
    if isinstance(v, int | float):
        n = float(v)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"`{field}` must be a size such as 2GB, 500MiB or 1500000, got {v!r}")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n > 0 or n != n or n == float("inf"):
        raise ValueError(f"`{field}` must be a positive size, got {v!r}")
    return int(n)


class BudgetConfig(_Frozen):
    """Bytes the bundle may use, allocated across tensors by their spectra (instead of one rate)."""

    branch_bytes: float | None = Field(
        default=None, gt=0,
        description="Each compressed branch's own bytes (factors, scales, per-branch tensors) as a fraction of "
                    "its dense size at the bundle dtype, e.g. 0.05. The shared part (W̄) is not counted.")
    total_bytes: int | None = Field(default=None, description="The whole bundle's size, e.g. 2GB or 1500000.")
    objective: Literal["delta", "weight"] = Field(
        default="delta",
        description="What the allocation minimizes: the summed squared error of each tensor's difference relative "
                    "to that difference ('delta': every fine-tuned change counts alike) or relative to the weight "
                    "('weight': small differences matter less).")
    max_rank_factor: float = Field(
        default=4.0, ge=1.0, le=64.0,
        description="The rSVD computes this many times the rank a uniform rate would give; no tensor gets more.")

    @field_validator("total_bytes", mode="before")
    @classmethod
    def _total(cls, v: Any) -> Any:
        return None if v is None else parse_bytes(v, "budget.total_bytes")

    @model_validator(mode="after")
    def _one(self) -> BudgetConfig:
        if (self.branch_bytes is None) == (self.total_bytes is None):
            raise ValueError("`budget` takes exactly one of `branch_bytes` (fraction of a dense branch, e.g. 0.05) "
                             "and `total_bytes` (e.g. 2GB)")
        return self


class SliceSource(_Frozen):
    """Layers ``[start, end)`` of one branch's model, an input of a slice."""

    branch: str = Field(description="A branch's name (its model is read).")
    layer_range: tuple[int, int] = Field(description="[start, end): the layers taken, end excluded.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="This source's own per-model "
                                       "parameters (as a branch's), over the branch's.")

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class SliceConfig(_Frozen):
    """Output layers made of the same number of layers from each source, merged with the method (mergekit's
    slices: one source each with `passthrough` stacks layers, as frankenmerges and depth up-scaling do)."""

    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict, description="The method's parameters for this "
                                       "slice, over the merge's.")


CHAT_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral")  # packaged (_data/chat_templates), as mergekit's


def is_chat_template(value: str) -> bool:
    """Whether ``value`` is a chat template setting: ``auto``, a packaged name, or Jinja text."""
    return value == "auto" or value in CHAT_TEMPLATES or ("{" in value and len(value) >= 20)


class ModelToken(_Frozen):
    """A token's row taken from another token of a model (mergekit's ``kind: model_token``)."""

    kind: Literal["model_token"]
    model: str = Field(description="A branch's name, or `base`.")
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("a model_token source gives `token` or `token_id`, exactly one")
        return self


class ZeroToken(_Frozen):
    kind: Literal["zero"]


class TokenEmbedding(_Frozen):
    """Where a token's embedding (and head) row comes from when a model lacks the token, or always with
    ``force``: a model's own row (a branch's name, or `base`), another token's, or zeros."""

    source: ModelToken | ZeroToken | str | None = None
    force: bool = False


class TokenizerConfig(_Frozen):
    """mergekit's ``tokenizer:`` block for a baseline merge of models whose vocabularies differ."""

    source: str = Field(default="union", description="`union` (every model's tokens), `base`, or a branch's name.")
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1, le=4096)


class MergeConfig(_Frozen):
    """A whole merge: which models, how strongly to compress, where the math runs."""

    branches: list[BranchConfig]
    method: str = Field(default="branch", description="Merge method; see `branchmerge methods`.")
    base_model: str | None = Field(
        default=None, description="Model the fine-tunes started from (task_arithmetic, ties, dare_ties)."
    )
    compress_rate: float = Field(default=0.95, description="r in [0,1]: rank k = round((1-r)*min(m,n)).")
    compress_overrides: list[CompressOverride] = Field(default_factory=list)
    budget: BudgetConfig | None = Field(
        default=None, description="Byte budget allocated across tensors (exclusive with compress_rate).")
    factor_bits: Literal[16, 8, 4, "mixed"] = Field(
        default=16, description="Bits of the stored factors: 16 (the dtype), 8, 4, or mixed 8/4 (needs a budget).")
    group_size: Literal[32, 64, 128, 256] = Field(default=64, description="Entries per quantization scale.")
    rsvd: RSVDConfig = Field(default_factory=RSVDConfig)
    lora: Literal["exact", "merged"] = Field(
        default="exact",
        description="A group of PEFT LoRA adapters of one base (and that base): `exact` keeps each adapter's factors "
                    "over the base (W̄ = the base, s_i = 1; exact, the size of base + adapters; the rate applies "
                    "only to tensors an adapter changes otherwise, such as DoRA's); `merged` compresses them as "
                    "merged models, like full fine-tunes (what a `budget` needs).")
    dtype: DType = "bfloat16"
    device: str = "cpu"
    max_shard_bytes: int = Field(default=1 << 30, gt=0, description="Output shard size limit.")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Extra method parameters (e.g. density for ties)."
    )
    tokenizer_source: str | None = Field(
        default=None, description="Whose tokenizer a baseline merge's output takes: `base` (base_model's), a branch's "
                                  "name, or `union` (mergekit's; here only when every model has the same vocabulary). "
                                  "Default: the first model's.")
    tokenizer: TokenizerConfig | None = Field(
        default=None, description="mergekit's tokenizer merge for a baseline method: the output vocabulary (union, "
                                  "base or a branch's), where missing tokens' rows come from, padding.")
    chat_template: str | None = Field(
        default=None, description="A baseline merge's chat template: `auto` (the one most models have), alpaca, "
                                  "chatml, llama3, mistral, or Jinja text. Default: the tokenizer source's.")
    slices: list[SliceConfig] | None = Field(
        default=None, description="Build the output's layers slice by slice from layer ranges of the branches' "
                                  "models (a baseline method; `passthrough` stacks them).")

    @field_validator("compress_rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        return _check_rate(v, "compress_rate")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", v):
            raise ValueError(f"`device` must be cpu, cuda, cuda:N or mps, got {v!r}")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r}; known methods: {', '.join(METHODS)}")
        return v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        try:
            return dtype_name(v, default="bfloat16")
        except ConfigError as e:
            raise ValueError(str(e).replace("`dtype` ", "")) from None


    @model_validator(mode="after")
    def _branches(self) -> MergeConfig:
        if not self.branches:
            raise ValueError("`branches` must list at least one model, got none")
        seen: set[str] = set()
        for b in self.branches:
            if b.name in seen:
                raise ValueError(f"duplicate branch name {b.name!r} in `branches`: names must be unique")
            seen.add(b.name)
        standalone = {b.name for b in self.branches if b.standalone}
        groups = {b.group_name for b in self.branches if not b.standalone}
        clash = standalone & groups
        if clash:
            raise ValueError(f"group name(s) {sorted(clash)} clash with standalone branch names")
        method = METHODS[self.method]
        if self.budget is not None and ({"compress_rate", "compress_overrides"} & self.model_fields_set):
            given = sorted({"compress_rate", "compress_overrides"} & self.model_fields_set)
            raise ValueError(f"`budget` and {' and '.join(f'`{g}`' for g in given)} are exclusive: a budget "
                             "allocates ranks itself; give one or the other")
        if self.factor_bits == "mixed" and self.budget is None:
            raise ValueError("`factor_bits: mixed` needs a `budget` (it picks the 8-bit/4-bit split); with a "
                             "compress_rate use factor_bits 8 or 4")
        if method.fn is not None and (self.budget is not None or self.factor_bits != 16):
            raise ValueError(f"`budget` and `factor_bits` apply to the branch method, not {self.method!r}")
        if method.fn is None and self.parameters:
            raise ValueError(f"method {self.method!r} takes no `parameters`, got {sorted(self.parameters)}")
        if method.fn is not None and self.slices is None:
            method.check_settings(self.parameters)  # (with slices: under each slice's, below)
        if self.slices is not None:
            self._check_slices(method)
        if self.chat_template is not None:
            if method.fn is None:
                raise ValueError("`chat_template` applies to baseline methods; a bundle keeps each branch's template")
            if not is_chat_template(self.chat_template):
                raise ValueError(f"`chat_template` must be auto, one of {', '.join(CHAT_TEMPLATES)}, or Jinja text; "
                                 f"got {self.chat_template[:60]!r}")
        if self.tokenizer_source is not None or self.tokenizer is not None:
            self._check_tokenizer(method)
        for i, b in enumerate(self.branches):
            if not b.parameters:
                continue
            if method.fn is None:
                raise ValueError(f"branches[{i}] ({b.name}): `parameters` are a baseline method's per-model values; "
                                 f"method 'branch' takes none")
            try:
                method.check_settings(self.parameters, b.parameters)
            except ValueError as e:
                raise ValueError(f"branches[{i}] ({b.name}): {e}") from None
        return self

    def _check_tokenizer(self, method) -> None:
        names = [b.name for b in self.branches]
        field = "tokenizer_source" if self.tokenizer is None else "tokenizer.source"
        if method.fn is None:
            raise ValueError(f"`{field}` applies to baseline methods; a bundle keeps each branch's tokenizer")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give `tokenizer_source` or `tokenizer`, not both")
        source = self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

        def model(ref: str, where: str) -> None:
            if ref == "base" and not self.base_model:
                raise ValueError(f"`{where}: base` needs `base_model`")
            if ref not in ("base", *names):
                raise ValueError(f"`{where}` must be base or a branch's name ({', '.join(names)}), got {ref!r}")

        if source != "union":
            model(source, field)
        for tok, emb in (self.tokenizer.tokens if self.tokenizer else {}).items():
            if isinstance(emb.source, str):
                model(emb.source, f"tokenizer.tokens[{tok!r}].source")
            elif isinstance(emb.source, ModelToken):
                model(emb.source.model, f"tokenizer.tokens[{tok!r}].source.model")

    def _check_slices(self, method: Any) -> None:
        if method.fn is None:
            raise ValueError("`slices` build one plain model: they need a baseline method such as passthrough, not "
                             "'branch'")
        if not self.slices:
            raise ValueError("`slices` must list at least one slice")
        by_name = {b.name: b for b in self.branches}
        used: set[str] = set()
        for k, sl in enumerate(self.slices):
            try:
                method.check_settings({**self.parameters, **sl.parameters})
            except ValueError as e:
                raise ValueError(f"slices[{k}]: {e}") from None
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sl.sources}
            if len(lengths) > 1:
                raise ValueError(f"slices[{k}]: every source must give the same number of layers, got "
                                 f"{[list(src.layer_range) for src in sl.sources]}")
            for j, src in enumerate(sl.sources):
                b = by_name.get(src.branch)
                if b is None:
                    raise ValueError(f"slices[{k}].sources[{j}]: no branch named {src.branch!r} (branches: "
                                     f"{', '.join(by_name)})")
                used.add(src.branch)
                try:
                    method.check_settings({**self.parameters, **sl.parameters}, {**b.parameters, **src.parameters})
                except ValueError as e:
                    raise ValueError(f"slices[{k}].sources[{j}]: {e}") from None
        unused = [b.name for b in self.branches if b.name not in used]
        if unused:
            raise ValueError(f"branch(es) {unused} are in no slice: list them in a slice's sources or remove them")

    def rate_for(self, tensor_name: str) -> float:
        """Compress rate of one tensor: the last matching override wins, else the global rate."""
        rate = self.compress_rate
        for o in self.compress_overrides:
            if fnmatch.fnmatchcase(tensor_name, o.pattern):
                rate = o.compress_rate
        return rate

    def inputs(self) -> list[str]:
        """Every model the merge reads: each branch's model (and base, for an adapter) and ``base_model``."""
        out = [m for b in self.branches for m in b.model_and_base() if m is not None]
        return out + ([self.base_model] if self.base_model else [])

    def groups(self) -> dict[str, list[BranchConfig]]:
        """Branches by group name, in config order (a standalone branch is a group of its own)."""
        out: dict[str, list[BranchConfig]] = {}
        for b in self.branches:
            out.setdefault(b.group_name, []).append(b)
        return out

    def resolve_paths(self, base: Path) -> MergeConfig:
        """Make relative local model paths relative to `base` (the config file's folder)."""
        def local(model: str) -> str:
            p = Path(model).expanduser()
            if not p.is_absolute() and (model.startswith(".") or (base / p).exists()):
                return str((base / p).resolve())
            return model

        branches = []
        for b in self.branches:
            model, given = (b.model, b.base) if b.base is not None else split_plus(b.model, base)
            branches.append(b.model_copy(update={"model": local(model),
                                                 "base": None if given is None else local(given)}))
        update: dict[str, Any] = {"branches": branches}
        if self.base_model:
            update["base_model"] = local(self.base_model)
        return self.model_copy(update=update)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, naming the field path, for CLI output."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<dict>") -> MergeConfig:
    """Validate a dict into a MergeConfig (a mergekit config is read as one: :func:`from_mergekit`), turning
    pydantic errors into a ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at top level, got {type(data).__name__}")
    if "branches" not in data and ("merge_method" in data or "models" in data):
        from branchmerge.config_mergekit import from_mergekit  # (it reads mergekit's keys, then we validate)

        data = from_mergekit(data, source)
    return validate(MergeConfig, data, source)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML says keys are unique; PyYAML
    keeps the last, so a pasted second ``compress_rate:`` would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (lines {seen[key]} and {line})", key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


MAX_YAML_VALUES = 1_000_000  # values a YAML document may hold once its aliases are expanded


def check_expansion(data: Any, limit: int = MAX_YAML_VALUES) -> Any:
    """``data`` as loaded, after checking that its aliases do not expand it past ``limit`` values: YAML shares
    an anchored value where an alias repeats it, so a few lines (the "billion laughs") load small but become
    billions of values for anything that walks them.

    Raises:
        yaml.YAMLError: it expands past the limit.
    """
    sizes: dict[int, int] = {}

    def size(obj: Any) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        known = sizes.get(id(obj))
        if known is not None:
            return known
        sizes[id(obj)] = limit + 1  # (a value that holds itself: as large as can be)
        children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        total = 1
        for c in children:
            total += size(c)
            if total > limit:
                break
        sizes[id(obj)] = total
        return total

    if size(data) > limit:
        raise yaml.YAMLError(f"its aliases (*name) expand it to over {limit:,} values; write the values out")
    return data


_TOO_DEEP = "it nests deeper than can be read (hundreds of lists or mappings inside one another)"


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys, aliases that expand past :data:`MAX_YAML_VALUES` and
    nesting too deep to read (each a ``yaml.YAMLError``)."""
    try:
        return check_expansion(yaml.load(text, Loader=_StrictLoader))  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError(_TOO_DEEP) from None


def safe_load_all(text: str) -> list[Any]:
    """Every document of ``text`` (empty ones left out), each read as :func:`safe_load` reads one."""
    try:
        return [check_expansion(d) for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]  # noqa: S506
    except RecursionError:
        raise yaml.YAMLError(_TOO_DEEP) from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file, naming it in the error when it is missing, malformed or repeats a key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None


def validate(model: type[BaseModel], data: Any, source: str) -> Any:
    """``model.model_validate(data)`` with pydantic errors turned into one ConfigError naming fields."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path, **overrides: Any) -> MergeConfig:
    """Read a YAML merge config; `overrides` (e.g. compress_rate=0.9) replace top-level fields."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, str(path)).resolve_paths(path.parent)
