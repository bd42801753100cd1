"""PEFT LoRA adapters as merge inputs: an adapter folder read as the model its base becomes with it merged
(``W + scaling·B·A``, as PEFT's ``merge_and_unload`` computes it), one tensor at a time.

A team that fine-tunes with LoRA has an adapter folder per task (``adapter_config.json`` and
``adapter_model.safetensors``), not whole models. :class:`LoraSource` reads such a folder over its base
model's folder and gives the same interface as :class:`~branchmerge.io.models.ModelSource`, so every merge
method takes adapters and full fine-tunes alike. What it reads: LoRA and rsLoRA scaling, ``rank_pattern`` and
``alpha_pattern``, ``fan_in_fan_out`` (GPT-2's Conv1D), embedding LoRAs, DoRA's magnitude vectors,
``lora_bias``, trainable tokens (``trainable_token_indices``: new values of some embedding rows), and whole
tensors the adapter stores (``modules_to_save``, trained biases). Anything else
(another ``peft_type``, ``layer_replication``, a key that names no base tensor, a shape that does not fit)
is refused by name. The adapter's file is only ever read as safetensors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import safe_open

from branchmerge.common import nonfinite
from branchmerge.compress.lora import dora_weight, lora_delta, lora_factors
from branchmerge.config import split_plus
from branchmerge.errors import ModelInputError
from branchmerge.io.models import EXTRA_CONFIG_FILES, TOKENIZER_FILES, ModelSource, resolve_model_path

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TOKENS = ".token_adapter.trainable_tokens_delta"
_PATTERN_BUDGET_S = 2.0  # alpha_pattern's keys are regular expressions from a file: all of an adapter's matching


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (folder / ADAPTER_CONFIG).is_file()


class AdapterConfig(BaseModel):
    """The fields of PEFT's ``adapter_config.json`` that decide the merged weights (the rest is ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(default=8, gt=0)
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    base_model_name_or_path: str | None = None
    layer_replication: list | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def token_indices(self, module: str, where: str) -> list[int]:
        """The token rows PEFT's trainable tokens replace in ``module``: the list, or the entry of the dict whose
        key names the module's end (``embed_tokens``, ``lm_head``)."""
        spec = self.trainable_token_indices
        if isinstance(spec, dict):
            key = next((k for k in spec if module == k or module.endswith("." + k)), None)
            if key is None:
                raise ModelInputError(f"{where}: trainable tokens are stored for {module}, but "
                                      f"trainable_token_indices names {sorted(spec)}")
            spec = spec[key]
        if not spec:
            raise ModelInputError(f"{where}: trainable tokens are stored for {module}, but the config has no "
                                  "trainable_token_indices")
        if len(set(spec)) != len(spec):
            raise ModelInputError(f"{where}: trainable_token_indices for {module} repeat a token id")
        return list(spec)

    @field_validator("peft_type")
    @classmethod
    def _lora(cls, v: str) -> str:
        if v != "LORA":
            raise ValueError(f"only LORA adapters can be merged, got peft_type {v!r}")
        return v

    @field_validator("layer_replication")
    @classmethod
    def _no_replication(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("layer_replication changes the model's layers; such adapters cannot be merged")
        return v

    def pattern_key(self, patterns: dict[str, Any], module: str, where: str, deadline: float) -> str | None:
        """The key of ``patterns`` that applies to ``module`` as PEFT picks it: the module's own name, else the
        first key that matches its end (``(.*\\.)?KEY``, KEY a regular expression), all matching done by
        ``deadline`` (``time.monotonic()``)."""
        if module in patterns:
            return module
        for key in patterns:
            try:
                if regex.fullmatch(rf"(.*\.)?({key})", module, timeout=max(deadline - time.monotonic(), 1e-3)):
                    return key
            except regex.error as e:
                raise ModelInputError(f"{where}: pattern {key!r} is not a valid regular expression: {e}") from None
            except TimeoutError:
                raise ModelInputError(f"{where}: matching its patterns took over {_PATTERN_BUDGET_S:.0f} s (at "
                                      f"{key!r} on {module!r})") from None
        return None

    def scaling(self, module: str, rank: int, where: str, deadline: float) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for ``module``, whose factors have rank ``rank``."""
        key = self.pattern_key(self.alpha_pattern, module, f"{where} alpha_pattern", deadline)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


@dataclass
class _Module:
    """What the adapter changes in one base tensor."""

    a: str | None = None  # adapter keys
    b: str | None = None
    magnitude: str | None = None
    embedding: bool = False
    bias_of: str | None = None  # this entry is the lora_B bias added to that module's base bias
    module: str = ""  # the module as PEFT names it (transformers' name; the base's checkpoint may differ)


@dataclass
class LoraSource(ModelSource):
    """A PEFT LoRA adapter over its base model, read as the merged model (same interface as ModelSource:
    the base's tensor names, shapes and config; ``get`` returns a changed tensor in float32)."""

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    base: ModelSource | None = None
    adapter_file: Path = Path()
    changes: dict[str, _Module] = field(default_factory=dict)  # base tensor → what changes it
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor → adapter key holding it whole
    scalings: dict[str, float] = field(default_factory=dict)  # module → its factors' scaling
    resized: dict[str, tuple[int, ...]] = field(default_factory=dict)  # vocabulary tensors stored at a new size
    tokens: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # tensor → (key, rows): trainable tokens
    _adapter_handle: Any = field(default=None, repr=False)

    @classmethod
    def open_adapter(cls, name: str, folder: Path, base: str | None) -> LoraSource:
        """Open the adapter in ``folder`` over ``base`` (a model folder or hub id; None: the adapter's own
        ``base_model_name_or_path`` when that is a hub id) and check that every key fits a base tensor.

        Raises:
            ModelInputError: naming the branch, file, field or key at fault.
        """
        where = f"branch {name!r}: {folder / ADAPTER_CONFIG}"
        cfg = cls.read_config(name, folder)
        base = base or _hub_base(cfg.base_model_name_or_path, where)
        return cls.over(name, folder, cfg, ModelSource.open(f"{name} (base)", base))

    @classmethod
    def read_config(cls, name: str, folder: Path) -> AdapterConfig:
        """The adapter's validated ``adapter_config.json``.

        Raises:
            ModelInputError: naming the file and field at fault.
        """
        where = f"branch {name!r}: {folder / ADAPTER_CONFIG}"
        try:
            raw = json.loads((folder / ADAPTER_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelInputError(f"{where} is not valid JSON: {e}") from None
        except OSError as e:
            raise ModelInputError(f"{where} cannot be read: {e.strerror}") from None
        if not isinstance(raw, dict):
            raise ModelInputError(f"{where} must hold a JSON object, got a JSON {type(raw).__name__}")
        try:
            return AdapterConfig.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg'].removeprefix('Value error, ')}"
                                 for x in e.errors())
            raise ModelInputError(f"{where}: {problems}") from None

    @classmethod
    def over(cls, name: str, folder: Path, cfg: AdapterConfig, base_src: ModelSource) -> LoraSource:
        """The adapter in ``folder`` (config ``cfg``) over an opened base (a model folder, or any source with
        its tensors' names, shapes and values), every key checked against it."""
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = [p.name for p in folder.glob("adapter_model.*")]
            hint = f" (found {', '.join(pickled)}: pickled adapters are not loaded; save with safetensors)" \
                if pickled else ""
            raise ModelInputError(f"branch {name!r}: {folder} has no {ADAPTER_WEIGHTS}{hint}")
        src = cls(name=name, path=folder, hf_config=base_src.hf_config, weight_map=base_src.weight_map,
                  adapter=cfg, base=base_src, adapter_file=weights)
        src._handles, src._views = base_src._handles, base_src._views  # (a fused MoE base: read per expert)
        src._index()
        return src

    def _adapter(self) -> Any:
        if self._adapter_handle is None:
            try:
                self._adapter_handle = safe_open(str(self.adapter_file), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise ModelInputError(f"branch {self.name!r}: {self.adapter_file} is not a readable safetensors "
                                      f"file (corrupt or truncated?): {e}") from None
        return self._adapter_handle

    def _index(self) -> None:
        """Sort the adapter's keys into changes and replacements of base tensors, checking shapes."""
        h = self._adapter()
        where = f"branch {self.name!r}: {self.adapter_file}"
        suffixes = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_embedding_A": "ea",
                    ".lora_embedding_B": "eb", ".lora_magnitude_vector": "magnitude",
                    ".lora_magnitude_vector.weight": "magnitude", ".lora_B.bias": "bias"}
        from branchmerge.architectures import known

        arch = known(self.base.hf_config)

        def base_name(t: str) -> str:  # PEFT names transformers' modules (GPT-NeoX's lm_head is embed_out)
            return t if t in self.weight_map or arch is None else arch.checkpoint_path(t)
        for key in h.keys():
            if not key.startswith(_PREFIX):
                raise ModelInputError(f"{where}: key {key!r} does not start with {_PREFIX!r} (not a PEFT adapter key)")
            rest = key[len(_PREFIX):]
            if rest.endswith(_TOKENS):  # PEFT's trainable tokens: new values of some rows
                module = rest.removesuffix(_TOKENS)
                self.tokens[base_name(f"{module}.weight")] = (key, self.adapter.token_indices(module, where))
                continue
            suffix = next((s for s in suffixes if rest.endswith(s)), None)
            if suffix is None:
                # (a wrapped layer's own weight, as save_embedding_layers stores it)
                rest = base_name(rest.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", "."))
                if ".lora_" in rest:
                    raise ModelInputError(f"{where}: key {key!r} is a LoRA part this reader does not know")
                if rest not in self.weight_map:
                    raise ModelInputError(f"{where}: key {key!r} stores {rest!r}, which the base model "
                                          f"{self.base.path} does not have")
                self.replaced[rest] = key
                continue
            module, kind = rest.removesuffix(suffix), suffixes[suffix]
            if kind == "bias":
                self.changes.setdefault(base_name(f"{module}.bias"), _Module(bias_of=module))
                continue
            m = self.changes.setdefault(base_name(f"{module}.weight"), _Module(module=module))
            if kind in ("a", "ea"):
                m.a, m.embedding = key, kind == "ea"
            elif kind in ("b", "eb"):
                m.b = key
            else:
                m.magnitude = key
        for tensor, m in self.changes.items():
            if tensor not in self.weight_map:
                raise ModelInputError(f"{where}: the adapter changes {tensor!r}, which the base model "
                                      f"{self.base.path} does not have")
            if m.bias_of is not None:
                if base_name(f"{m.bias_of}.weight") not in self.changes:
                    raise ModelInputError(f"{where}: {m.bias_of}.lora_B.bias comes without the module's LoRA factors")
                if tuple(h.get_slice(f"{_PREFIX}{m.bias_of}.lora_B.bias").get_shape()) != tuple(self.shape(tensor)):
                    raise ModelInputError(f"{where}: {m.bias_of}.lora_B.bias does not have the shape of {tensor} "
                                          f"{list(self.shape(tensor))}")
                continue
            if m.a is None or m.b is None:
                raise ModelInputError(f"{where}: {tensor!r} has only one of its two LoRA factors "
                                      f"({m.a or m.b}); the file is incomplete")
            a, b = h.get_slice(m.a).get_shape(), h.get_slice(m.b).get_shape()
            shape = self.shape(tensor)
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise ModelInputError(f"{where}: {m.a} {list(a)} and {m.b} {list(b)} are not LoRA factors of one "
                                      "rank (A [r, in], B [out, r])")
            fan = self.adapter.fan_in_fan_out and not m.embedding
            want = (a[1], b[0]) if m.embedding or fan else (b[0], a[1])
            if tuple(shape) != want:
                raise ModelInputError(f"{where}: factors {m.a} {list(a)} and {m.b} {list(b)} make a {list(want)} "
                                      f"change, but {tensor} is {list(shape)} in the base model")
            if m.magnitude is not None:
                if m.embedding:
                    raise ModelInputError(f"{where}: DoRA on an embedding ({m.magnitude}) is not supported")
                mag = h.get_slice(m.magnitude).get_shape()
                if list(mag) != [want[0]]:
                    raise ModelInputError(f"{where}: {m.magnitude} is {list(mag)}, expected [{want[0]}]")
            elif self.adapter.use_dora:
                raise ModelInputError(f"{where}: use_dora is set but {tensor!r} has no lora_magnitude_vector")
        for tensor, key in self.replaced.items():
            got, want = tuple(h.get_slice(key).get_shape()), tuple(self.shape(tensor))
            if got != want and not self._vocab_row_change(tensor, got, want):
                raise ModelInputError(f"{where}: {key} is {list(got)}, but {tensor} is {list(want)} in the base model")
        for tensor, (key, rows) in self.tokens.items():
            shape, got = self.shape(tensor), tuple(h.get_slice(key).get_shape())
            if tensor not in self.weight_map or len(shape) != 2:
                raise ModelInputError(f"{where}: {key} holds trainable tokens for {tensor!r}, which the base model "
                                      f"{self.base.path} does not have as a matrix")
            if tensor in self.changes:
                raise ModelInputError(f"{where}: {tensor} has both LoRA factors and trainable tokens")
            if got != (len(rows), shape[1]):
                raise ModelInputError(f"{where}: {key} is {list(got)}; {len(rows)} trainable_token_indices of "
                                      f"{tensor} {list(shape)} make [{len(rows)}, {shape[1]}]")
            past = sorted(r for r in rows if r >= shape[0])
            if any(r < 0 for r in rows) or (past and tensor in self.replaced):
                raise ModelInputError(f"{where}: trainable_token_indices {[r for r in rows if r < 0 or r in past][:5]} "
                                      f"are outside {tensor}'s {shape[0]} rows")
            # (sorted and unique: rows shape[0]..past[-1] are all given when there are as many; a row id from the
            # file is never iterated up to)
            gaps = [] if not past or past[-1] - shape[0] + 1 == len(past) else [
                r for r in range(shape[0], shape[0] + len(past) + 5) if r not in set(past)]
            if gaps:
                raise ModelInputError(f"{where}: trainable_token_indices reach row {past[-1]}, past {tensor}'s "
                                      f"{shape[0]} rows, but do not give rows {gaps[:5]}: each row a resized "
                                      "vocabulary adds must be given")
            if past:  # new tokens' rows (the base resized first, as PEFT expects): a resized vocabulary
                self.resized[tensor] = (past[-1] + 1, shape[1])
        self._check_resized(where)
        deadline = time.monotonic() + _PATTERN_BUDGET_S  # (the patterns are matched now, before any work)
        for tensor, m in self.changes.items():
            if m.bias_of is None:
                module = m.module or tensor.removesuffix(".weight")
                self.scalings[module] = self.adapter.scaling(module, h.get_slice(m.a).get_shape()[0],
                                                             f"branch {self.name!r}: {self.path / ADAPTER_CONFIG}",
                                                             deadline)
        logger.info("branch %r: LoRA adapter changes %d and replaces %d tensors of %s (trainable tokens in %d)",
                    self.name, len(self.changes), len(self.replaced), self.base.path, len(self.tokens))

    def _vocab_row_change(self, tensor: str, got: tuple, want: tuple) -> bool:
        """Whether a stored copy of ``tensor`` differs from the base's only in its vocabulary rows (an adapter
        trained after ``resize_token_embeddings``); records it."""
        from branchmerge.architectures import for_hf_config

        vocab = self.base.hf_config.get("vocab_size")
        if len(got) != 2 or len(want) != 2 or got[1] != want[1] or want[0] != vocab or got[0] < 1:
            return False
        if for_hf_config(self.base.hf_config).role(tensor, want) == "compress":
            return False
        self.resized[tensor] = got
        return True

    def _check_resized(self, where: str) -> None:
        """A resized vocabulary: one new size, every vocabulary tensor of the base stored at it (embeddings and an
        untied head), no LoRA factors on them; the adapter's config then says ``vocab_size``."""
        if not self.resized:
            return
        sizes = {shape[0] for shape in self.resized.values()}
        vocab = self.base.hf_config.get("vocab_size")
        if len(sizes) != 1:
            raise ModelInputError(f"{where}: its stored copies resize the vocabulary to different sizes "
                                  f"({', '.join(f'{t} {list(v)}' for t, v in self.resized.items())})")
        from branchmerge.architectures import for_hf_config

        arch = for_hf_config(self.base.hf_config)
        rows = [t for t in self.weight_map if len(self.base.shape(t)) == 2 and self.base.shape(t)[0] == vocab
                and arch.role(t, self.base.shape(t)) != "compress"]
        left = [t for t in rows if t not in self.resized]
        if left:
            raise ModelInputError(f"{where}: it resizes the vocabulary ({vocab} → {sizes.pop()} rows in "
                                  f"{', '.join(self.resized)}) but not {', '.join(left)}")
        changed = [t for t in self.resized if t in self.changes]
        if changed:
            raise ModelInputError(f"{where}: LoRA factors on {changed[0]}, whose vocabulary it resizes, are not supported")
        self.hf_config = {**self.hf_config, "vocab_size": next(iter(self.resized.values()))[0]}
        logger.info("branch %r: the adapter resizes the vocabulary from %d to %d rows", self.name, vocab,
                    self.hf_config["vocab_size"])

    def _read(self, key: str) -> torch.Tensor:
        t = self._adapter().get_tensor(key)
        if bad := nonfinite(t):
            raise ModelInputError(f"branch {self.name!r}: tensor {key} in {self.adapter_file} has {bad} NaN/Inf "
                                  "value(s)")
        return t

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.resized.get(tensor) or self.base.shape(tensor)

    def get(self, tensor: str, *, check_finite: bool = True) -> torch.Tensor:
        """The merged model's tensor: the base's (or the adapter's own copy of it), changed by the adapter's
        factors (then in float32)."""
        if tensor in self.replaced:
            t = self._read(self.replaced[tensor])
        else:
            t = self.base.get(tensor, check_finite=check_finite)
        if tensor in self.tokens:  # PEFT's TrainableTokensLayer merge: index_copy of the stored rows
            key, rows = self.tokens[tensor]
            size = self.shape(tensor)[0]
            t = torch.cat([t, t.new_zeros(size - t.shape[0], *t.shape[1:])]) if size > t.shape[0] else t.clone()
            t[torch.tensor(rows)] = self._read(key).to(t.dtype)  # (every row past the base's is among them)
        m = self.changes.get(tensor)
        if m is None:
            return t
        if m.bias_of is not None:  # lora_bias: B's bias, scaled, adds to the base's bias
            return t.float() + self.scalings[m.bias_of] * self._read(f"{_PREFIX}{m.bias_of}.lora_B.bias").float()
        a, b = self._read(m.a), self._read(m.b)
        delta = lora_delta(a, b, self.scalings[m.module or tensor.removesuffix(".weight")],
                           embedding=m.embedding, fan_in_fan_out=self.adapter.fan_in_fan_out)
        if m.magnitude is not None:
            return dora_weight(t, delta, self._read(m.magnitude), fan_in_fan_out=self.adapter.fan_in_fan_out)
        return t.float() + delta

    def change_rank(self, tensor: str) -> int | None:
        """How the adapter changes ``tensor``: 0 not at all, the rank of its factors where they alone change it
        (from the file's header), None where it changes it otherwise (a stored copy, DoRA's rescaling, a bias)."""
        m = self.changes.get(tensor)
        if tensor in self.replaced or tensor in self.tokens or (m is not None and (m.magnitude or m.bias_of or m.embedding)):
            return None
        return 0 if m is None else int(self._adapter().get_slice(m.a).get_shape()[0])

    def factors(self, tensor: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``U [m, rank]``, ``V [rank, n]`` (float32, zero-padded) whose product is the adapter's change of
        ``tensor`` as stored (a ``"lora"`` change)."""
        m = self.changes[tensor]
        a, b = self._read(m.a), self._read(m.b)
        return lora_factors(a, b, self.scalings[m.module or tensor.removesuffix(".weight")], rank,
                            fan_in_fan_out=self.adapter.fan_in_fan_out)

    def nbytes(self) -> int:
        return self.base.nbytes() + self.adapter_file.stat().st_size

    def side_files(self) -> dict[str, Path]:
        """The base's tokenizer and generation files, each replaced by the adapter folder's own where it has one."""
        own = {f: self.path / f for f in TOKENIZER_FILES + EXTRA_CONFIG_FILES if (self.path / f).is_file()}
        return {**self.base.side_files(), **own}


def _hub_base(named: str | None, where: str) -> str:
    """The adapter's own ``base_model_name_or_path`` when it is a hub id; a path in a file is not followed."""
    hint = "give the branch's `base:` (or the config's `base_model`, or write `model: BASE+ADAPTER`)"
    if not named:
        raise ModelInputError(f"{where} names no base_model_name_or_path: {hint}")
    p = Path(named).expanduser()
    if named.count("/") != 1 or named.startswith((".", "/", "~")) or p.is_absolute():
        raise ModelInputError(f"{where} names its base as the path {named!r}; a path read from a file is not "
                              f"followed: {hint}")
    return named


def open_model(name: str, model: str, revision: str | None = None, base: str | None = None, *,
               default_base: str | None = None) -> ModelSource:
    """An input model: a model folder (or hub id) as :class:`ModelSource`, or a PEFT LoRA adapter folder over
    ``base`` (else ``default_base``, a config's ``base_model``) as :class:`LoraSource`.

    Raises:
        ModelInputError: ``base`` given for a folder that is not an adapter, or any input problem.
    """
    if base is None:
        model, base = split_plus(model)  # (mergekit's BASE+ADAPTER, when not a path as written)
    path = resolve_model_path(model, revision)
    if is_adapter(path):
        return LoraSource.open_adapter(name, path, base or default_base)
    if base is not None:
        raise ModelInputError(f"branch {name!r}: `base` ({base}) is given but {model} is not a PEFT adapter "
                              f"folder (it has no {ADAPTER_CONFIG})")
    return ModelSource.open(name, model, revision)
