"""The bundle manifest as typed, validated data: read once, every path checked to stay in the bundle.

A manifest is input like any other file: a crafted one must not name shard or side files outside the
bundle (``../.bashrc``, absolute paths), point a tensor at a file that is not a checksummed shard, or
leave out fields that later code reads. :func:`parse_manifest` refuses all of these with a
:class:`~branchmerge.errors.BundleError` that names the field.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from branchmerge.common import check_name
from branchmerge.errors import BundleError

FORMAT = "branchmerge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorRecord(_Frozen):
    """How one HF tensor of a group is stored."""

    role: Literal["compressed", "shared", "per_branch"]
    shape: list[int]
    bytes: int = Field(ge=0)
    compress_rate: float | None = None
    rank: int | None = Field(default=None, ge=0)
    dense: bool = False
    rel_error: dict[str, float] = Field(default_factory=dict)
    same_as: dict[str, str] = Field(default_factory=dict, description="Per-branch tensors: branch → an earlier "
                                    "branch of the group holding identical values (stored once).")
    patches: dict[str, str] = Field(default_factory=dict, description="Per-branch 2-D tensors stored as another "
                                    "branch's (a fully stored one) with some rows replaced or added: branch → that "
                                    "branch (the rows and their values are the branch's `rows` and `values` parts).")
    shapes: dict[str, list[int]] = Field(default_factory=dict, description="Per-branch tensors indexed by the "
                                         "vocabulary (embeddings, head) of a branch whose vocabulary differs from "
                                         "the first's: branch → its shape (the others have `shape`).")
    bits: list[tuple[Literal[8, 4], int]] | None = Field(
        default=None, description="Quantized factors: (bit width, triplets) in order, high width first.")
    group_size: Literal[32, 64, 128, 256] | None = None

    @model_validator(mode="after")
    def _bits(self) -> TensorRecord:
        if any(d < 1 for d in self.shape):
            raise ValueError(f"`shape` {self.shape} has a dimension below 1")
        if self.rank is not None and (len(self.shape) != 2 or self.rank > min(self.shape)):
            raise ValueError(f"`rank` {self.rank} does not fit a 2-D tensor of shape {self.shape}")
        if self.bits is not None:
            if self.role != "compressed" or self.group_size is None or self.dense or len(self.shape) != 2:
                raise ValueError("`bits` needs a compressed 2-D low-rank record with a `group_size`")
            if any(c < 0 for _, c in self.bits) or sum(c for _, c in self.bits) != (self.rank or 0):
                raise ValueError(f"`bits` {self.bits} must count the record's {self.rank} triplets")
        for b, shape in self.shapes.items():
            if self.role != "per_branch" or len(shape) != len(self.shape) or len(shape) < 2 or (
                    shape[1:] != self.shape[1:] or shape[0] < 1):
                raise ValueError(f"`shapes.{b}` {shape}: only a per-branch tensor's first dimension (its "
                                 f"vocabulary) may differ from `shape` {self.shape}")
        for b, h in self.same_as.items():
            if self.shape_of(b) != self.shape_of(h):
                raise ValueError(f"`same_as.{b}`: {h!r} holds a tensor of another shape")
        for b, h in self.patches.items():
            if (self.role != "per_branch" or len(self.shape) != 2 or h in self.patches or h in self.same_as
                    or b in self.same_as or b == h):
                raise ValueError(f"`patches.{b}`: only a per-branch matrix may patch another branch's, stored whole "
                                 f"(got {h!r})")
            if self.shape_of(h)[1:] != self.shape_of(b)[1:] or self.shape_of(h)[0] > self.shape_of(b)[0]:
                raise ValueError(f"`patches.{b}`: {h!r}'s {self.shape_of(h)} cannot be patched into {self.shape_of(b)}")
        return self

    def holder(self, branch: str) -> str:
        """The branch whose stored copy ``branch`` reads."""
        return self.same_as.get(branch, branch)

    def shape_of(self, branch: str) -> list[int]:
        """``branch``'s shape of the tensor (its own vocabulary's, for embeddings and head)."""
        return self.shapes.get(branch, self.shape)


class GroupInfo(_Frozen):
    branches: list[str] = Field(min_length=1)
    architecture: str
    standalone: bool
    transposed: bool = False
    lora_base: str | None = Field(default=None, description="The base model the group's LoRA adapters were kept "
                                  "exactly over (W̄ its weights, every s_i 1), as the merge read it.")


class BranchInfo(_Frozen):
    group: str
    standalone: bool
    source: str
    source_bytes: int = Field(ge=0)
    source_params: int = Field(ge=0)
    architectures: list[str] | None = None
    hf_config: dict[str, Any]
    files: list[str]

    @field_validator("files")
    @classmethod
    def _files(cls, v: list[str]) -> list[str]:
        for f in v:
            check_name(f, "side file")
        if "config.json" not in v:
            raise ValueError("must list config.json")
        return v


class Manifest(_Frozen):
    """``manifest.json``: everything about a bundle except the tensors' values."""

    format: Literal["branchmerge-bundle"]
    format_version: Literal[1]
    created_by: str
    config: dict[str, Any]
    dtype: Literal["float32", "float16", "bfloat16"]
    branches: dict[str, BranchInfo] = Field(min_length=1)
    groups: dict[str, GroupInfo] = Field(min_length=1)
    tensors: dict[str, dict[str, TensorRecord]]
    shards: dict[str, str]
    weight_map: dict[str, str]
    total_bytes: int = Field(ge=0)
    allocation: dict[str, Any] | None = Field(default=None, description="The byte budget and what each part cost.")

    @field_validator("shards")
    @classmethod
    def _shards(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            if not _SHARD_RE.match(name):
                raise ValueError(f"shard name {name!r} is not a plain *.safetensors file name in the bundle")
            if not _SHA_RE.match(digest):
                raise ValueError(f"shard {name}: {digest!r} is not a sha256 hex digest")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        for name, b in self.branches.items():
            check_name(name, "branch name")
            g = self.groups.get(b.group)
            if g is None or name not in g.branches:
                raise ValueError(f"branches.{name}.group: {b.group!r} is not a group listing this branch")
        for gname, g in self.groups.items():
            check_name(gname, "group name")
            for b in g.branches:
                if b not in self.branches:
                    raise ValueError(f"groups.{gname}.branches: {b!r} is not in `branches`")
            if gname not in self.tensors:
                raise ValueError(f"tensors: group {gname!r} has no tensor records")
            for t, rec in self.tensors[gname].items():
                if rec.role == "compressed" and set(rec.rel_error) - set(g.branches):
                    raise ValueError(f"tensors.{gname}.{t}.rel_error names branches outside the group")
                for b, h in rec.same_as.items():
                    if b not in g.branches or h not in g.branches or h in rec.same_as or rec.role != "per_branch":
                        raise ValueError(f"tensors.{gname}.{t}.same_as: {b!r} → {h!r} is not a branch of the group "
                                         "pointing at a stored per-branch copy")
                if set(rec.patches) - set(g.branches) or set(rec.patches.values()) - set(g.branches):
                    raise ValueError(f"tensors.{gname}.{t}.patches names branches outside the group")
                if set(rec.shapes) - set(g.branches[1:]):
                    raise ValueError(f"tensors.{gname}.{t}.shapes names {sorted(set(rec.shapes) - set(g.branches[1:]))}"
                                     ", not later branches of the group")
                for b in g.branches if rec.shapes else ():
                    vocab = self.branches[b].hf_config.get("vocab_size")
                    if rec.shape_of(b)[0] != vocab:
                        raise ValueError(f"tensors.{gname}.{t}: branch {b!r}'s rows ({rec.shape_of(b)[0]}) are not "
                                         f"its config's vocab_size ({vocab!r}); only vocabularies may differ")
        extra = set(self.tensors) - set(self.groups)
        if extra:
            raise ValueError(f"tensors: group(s) {sorted(extra)} are not in `groups`")
        for key, shard in self.weight_map.items():
            if shard not in self.shards:
                raise ValueError(f"weight_map.{key}: file {shard!r} is not a listed (checksummed) shard")
        return self

    def group_of(self, branch: str) -> GroupInfo:
        return self.groups[self.branches[branch].group]


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate a manifest read from ``source``.

    Raises:
        BundleError: not a branchmerge manifest, an unsupported format version, or a field that is
            missing or wrong (named).
    """
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object, got a JSON {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise BundleError(f"{source}: format is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{source}: format_version {version!r} is not supported by this branchmerge "
                          f"(supports {FORMAT_VERSION}); upgrade branchmerge or re-merge")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or '(top level)'}: {x['msg'].removeprefix('Value error, ')}"
                         for x in e.errors()[:5])
        raise BundleError(f"{source} is not a valid bundle manifest: {errs}") from None
