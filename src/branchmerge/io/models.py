"""Reading input models lazily: one tensor at a time through the safetensors shard index.

Only safetensors are read; pickled checkpoints (``*.bin``, ``*.pt``) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from branchmerge.common import nonfinite
from branchmerge.errors import ModelInputError
from branchmerge.io.mxfp4 import QUANT_METHOD, dequantize_mxfp4, fused_shape

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
EXTRA_CONFIG_FILES = ("generation_config.json",)


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id downloaded (safetensors and configs only).

    Raises:
        ModelInputError: if the path does not exist and the hub cannot provide it.
    """
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelInputError(f"model {model}: expected a folder with config.json, got a file")
        return p
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelInputError(f"model path {model} does not exist")
    try:  # the real hub path for users who have a hub; nothing in this project relies on it
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise ModelInputError(
            f"model {model}: not a local folder, and downloading it from the hub failed: {e}"
        ) from None
    return Path(local)


@dataclass
class ModelSource:
    """An input model folder: its HF config and a lazy name → shard map of its tensors."""

    name: str
    path: Path
    hf_config: dict
    weight_map: dict[str, Path]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    # name → where it lies in a fused tensor: an MoE stored in transformers 5's fused layout read per expert
    _views: dict[str, _View] = field(default_factory=dict, repr=False)
    _stored: dict[str, Path] = field(default_factory=dict, repr=False)  # every stored tensor's shard

    @classmethod
    def open(cls, name: str, model: str, revision: str | None = None) -> ModelSource:
        """Validate a folder (config.json, safetensors weights) and index its tensors.

        Raises:
            ModelInputError: naming the branch and file when anything is missing or unreadable.
        """
        path = resolve_model_path(model, revision)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelInputError(f"branch {name!r}: {path} has no config.json (not a Hugging Face model folder)")
        try:
            hf_config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelInputError(f"branch {name!r}: {cfg_path} is not valid JSON: {e}") from None
        check_hf_config(hf_config, f"branch {name!r}: {cfg_path}")
        weight_map = _weight_map(name, path)
        src = cls(name=name, path=path, hf_config=hf_config, weight_map=weight_map, _stored=dict(weight_map))
        for shard in sorted(set(weight_map.values())):
            src._handle(shard)  # open each shard now so corrupt files fail before any work
        src._views = _expert_views(hf_config, list(weight_map), src.shape)
        if src._views:  # the checkpoint layout's names in place of the fused ones (same order otherwise)
            stored = {v.real for v in src._views.values()}
            views = {real: [v for v, view in src._views.items() if view.real == real] for real in stored}
            scales = {v.scales for v in src._views.values()}  # (read with their blocks)
            src.weight_map = {v: shard for n, shard in weight_map.items() if n not in scales
                              for v in views.get(n, [n])}
        if (hf_config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
            if (odd := next((n for n in src.weight_map if n.endswith("_blocks")), None)) is not None:
                raise ModelInputError(f"branch {name!r}: {path}: MXFP4 tensor {odd} has no "
                                      f"{odd.removesuffix('_blocks')}_scales beside it, or is not a gpt-oss model's "
                                      "fused experts (the only MXFP4 tensors read)")
            # read dequantized (bfloat16, as transformers dequantizes them): the model of a dense config
            src.hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
        return src

    def _handle(self, shard: Path):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(shard), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise ModelInputError(
                    f"branch {self.name!r}: {shard} is not a readable safetensors file "
                    f"(corrupt or truncated?): {e}"
                ) from None
            self._handles[shard] = h
        return h

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, tensor: str) -> tuple[int, ...]:
        if tensor in self._views:
            view = self._views[tensor]
            return view.shape(tuple(self._handle(self._shard(tensor)).get_slice(view.real).get_shape()))
        return tuple(self._handle(self._shard(tensor)).get_slice(tensor).get_shape())

    def _shard(self, tensor: str) -> Path:
        try:
            return self.weight_map[tensor]
        except KeyError:
            raise ModelInputError(f"branch {self.name!r}: tensor {tensor} is missing from {self.path}") from None

    def get(self, tensor: str, *, check_finite: bool = True) -> torch.Tensor:
        """Read one tensor from disk.

        Raises:
            ModelInputError: if the tensor is missing, unreadable, or holds NaN/Inf.
        """
        shard = self._shard(tensor)
        view = self._views.get(tensor)
        try:
            t = self._handle(shard).get_tensor(tensor) if view is None else \
                view.read(self._handle(shard), lambda n: self._handle(self._stored[n]))
        except Exception as e:  # noqa: BLE001
            raise ModelInputError(
                f"branch {self.name!r}: tensor {tensor} in {shard} could not be read: {e}"
            ) from None
        if check_finite and (bad := nonfinite(t)):
            raise ModelInputError(
                f"branch {self.name!r}: tensor {tensor} in {shard} has {bad} NaN/Inf value(s)"
            )
        return t

    def numel(self) -> int:
        return sum(math.prod(self.shape(n)) for n in self.weight_map)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.weight_map.values()))

    def vocabulary(self) -> str | None:
        """A fingerprint of the tokenizer's vocabulary (its tokens, merges and added tokens, not its chat
        template or other settings), or None without a tokenizer."""
        h = hashlib.sha256()
        found = False
        for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"):
            path = self.path / f
            if not path.is_file():
                continue
            found = True
            data = path.read_bytes()
            if f == "tokenizer.json":
                try:
                    tj = json.loads(data)
                    data = json.dumps([tj.get("model"), tj.get("added_tokens")], sort_keys=True).encode()
                except (ValueError, AttributeError):
                    pass
            h.update(f.encode() + b"\0" + data)
        return h.hexdigest() if found else None

    def side_files(self) -> dict[str, Path]:
        """Tokenizer and generation-config files present in the folder, by file name."""
        return {f: self.path / f for f in TOKENIZER_FILES + EXTRA_CONFIG_FILES if (self.path / f).is_file()}


# config.json fields that size a model: each must be a positive integer where present
SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head", "n_positions",
               "n_inner")


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_hf_config(cfg: object, where: str) -> dict:
    """A model's ``config.json`` content: a mapping whose size fields are positive integers.

    Raises:
        ModelInputError: naming ``where`` and the field at fault.
    """
    if not isinstance(cfg, dict):
        raise ModelInputError(f"{where} must hold a JSON object, got a JSON {type(cfg).__name__}")
    for f in SIZE_FIELDS:
        v = cfg.get(f)
        if v is None and f in ("n_inner", "head_dim", "num_key_value_heads"):
            continue  # optional: null means "derive it"
        if f == "intermediate_size" and isinstance(v, list) and v:  # (Gemma 3n: one per layer)
            if not all(_positive_int(x) for x in v):
                raise ModelInputError(f"{where}: field {f} must be a positive integer or a list of them, got {v!r}")
        elif f in cfg and not _positive_int(v):
            raise ModelInputError(f"{where}: field {f} must be a positive integer, got {v!r}")
    return cfg


def _weight_map(name: str, path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text())["weight_map"]
            if not isinstance(data, dict):
                raise TypeError("weight_map is not a mapping")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ModelInputError(f"branch {name!r}: {index} is not a valid shard index: {e}") from None
        out = {}
        root = path.resolve()
        for tensor, shard in data.items():
            f = path / str(shard)
            if not isinstance(shard, str) or Path(shard).is_absolute() or root not in f.resolve().parents:
                raise ModelInputError(f"branch {name!r}: shard {shard!r} for tensor {tensor} in {index} is not "
                                      f"a file inside {path}")
            if not f.is_file():
                raise ModelInputError(f"branch {name!r}: shard {shard} listed in {index} does not exist")
            out[tensor] = f
        return out
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(pickled)}: pickled checkpoints are not loaded; convert them to "
            "safetensors first)"
            if pickled
            else ""
        )
        raise ModelInputError(f"branch {name!r}: {path} has no *.safetensors weights{hint}")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                keys = list(h.keys())
        except Exception as e:  # noqa: BLE001
            raise ModelInputError(
                f"branch {name!r}: {f} is not a readable safetensors file (corrupt or truncated?): {e}"
            ) from None
        for k in keys:
            out[k] = f
    return out


class _View(NamedTuple):
    """One expert's tensor inside a fused one: ``real[expert][index]``, transposed where ``transpose``; with
    ``scales``, ``real`` holds MXFP4 blocks (:mod:`~branchmerge.io.mxfp4`) of the fused tensor transposed."""

    real: str
    expert: int | None = None  # (None: the whole stored tensor under another name)
    index: tuple[slice, ...] = ()
    transpose: bool = False
    scales: str | None = None

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.expert is None:
            return full
        if self.scales is not None:  # (blocks: the fused tensor's shape)
            full = fused_shape(full)
        dims = list(full[1:])
        for i, sl in enumerate(self.index):
            dims[i] = len(range(*sl.indices(dims[i])))
        return tuple(dims[::-1]) if self.transpose else tuple(dims)

    def read(self, handle, handle_of) -> torch.Tensor:
        """This tensor from ``handle`` (the stored tensor's shard; ``handle_of(name)``: another's)."""
        if self.expert is None:
            return handle.get_tensor(self.real)
        e = self.expert
        if self.scales is not None:  # (one expert's blocks dequantized: [R, G·32], the fused slab transposed)
            slab = dequantize_mxfp4(handle.get_slice(self.real)[e:e + 1][0],
                                    handle_of(self.scales).get_slice(self.scales)[e:e + 1][0]).T
            t = slab[self.index]
        elif all(sl.step in (None, 1) for sl in self.index):  # (contiguous: only these rows are read)
            t = handle.get_slice(self.real)[(slice(e, e + 1), *self.index)][0]
        else:  # interleaved columns (gpt-oss's gate and up): the expert's tensor, then every other column
            t = handle.get_slice(self.real)[e:e + 1][0][self.index]
        return (t.T if self.transpose else t).contiguous()


class Fused(NamedTuple):
    """How one fused tensor of a layer holds its experts' tensors: each expert's slab is ``parts`` (``(projection,
    parameter)`` pairs) split along ``axis`` in equal blocks, or alternating (``interleaved``), each stored
    transposed where ``transpose``."""

    parts: tuple[tuple[str, str], ...]
    axis: int = 0
    interleaved: bool = False
    transpose: bool = False

    def index(self, k: int, dims: tuple[int, ...]) -> tuple[slice, ...]:
        """Where part ``k`` lies in an expert's slab of a fused tensor of shape ``dims`` (``[E, ...]``)."""
        n = len(self.parts)
        if n == 1:
            return ()
        size = dims[1 + self.axis] // n
        part = slice(k, None, n) if self.interleaved else slice(k * size, (k + 1) * size)
        return (slice(None),) * self.axis + (part,)

    def join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One expert's slab from its parts' tensors (the inverse of reading them at :meth:`index`)."""
        ts = [t.T if self.transpose else t for t in tensors]
        if len(ts) == 1:
            return ts[0]
        if self.interleaved:
            return torch.stack(ts, dim=self.axis + 1).flatten(self.axis, self.axis + 1)
        return torch.cat(ts, dim=self.axis)


def fused_experts(spec) -> dict[str, Fused]:
    """An experts layout's fused tensors (by parameter name) and how each holds its experts (``spec.layout``)."""
    gate_up, down = ((spec.gate, "weight"), (spec.up, "weight")), ((spec.down, "weight"),)
    if spec.layout == "gpt_oss":  # [E, H, 2I] gate and up in alternate columns, [E, I, H] down; biases alike
        return {"gate_up_proj": Fused(gate_up, 1, interleaved=True, transpose=True),
                "down_proj": Fused(down, transpose=True),
                "gate_up_proj_bias": Fused(((spec.gate, "bias"), (spec.up, "bias")), 0, interleaved=True),
                "down_proj_bias": Fused(((spec.down, "bias"),))}
    if spec.layout == "llama4":  # [E, H, 2I] gate columns then up columns, [E, I, H] down
        return {"gate_up_proj": Fused(gate_up, 1, transpose=True), "down_proj": Fused(down, transpose=True)}
    if spec.layout == "nemotron_h":  # [E, I, H] up, [E, H, I] down: no gate
        return {"up_proj": Fused(((spec.up, "weight"),)), "down_proj": Fused(down)}
    # [E, 2I, H] gate rows then up rows, [E, H, I] down (Mixtral, Qwen-MoE, GraniteMoE)
    return {"gate_up_proj": Fused(gate_up), "down_proj": Fused(down)}


def _expert_views(hf_config: dict, names: list[str], shape) -> dict[str, _View]:
    """For an MoE model stored in transformers 5's fused layout (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
    ``mlp.experts.down_proj`` ``[E, H, I]``: what ``moe`` and mergekit-moe write; GraniteMoE's checkpoints,
    ``input_linear``/``output_linear``, renamed so by its template), the checkpoint layout's
    names (one 2-D tensor per expert and projection; Mixtral's ``block_sparse_moe.``) mapped to where each
    lies: ``{name: (stored name, expert or None, rows or None)}``. Empty for any other model.

    Read this way, every expert is a weight of its own to merge, compress or compare with a checkpoint's."""
    from branchmerge.architectures import known

    arch = known(hf_config)
    if arch is None or not arch.experts or not any(arch.param_path(n).endswith(_FUSED + _MXFP4) for n in names):
        return {}
    spec = arch.experts
    views: dict[str, tuple[str, int | None, slice | None]] = {}
    for n in names:
        path = arch.param_path(n)  # (GraniteMoE's checkpoints: input_linear, output_linear)
        module, _, param = path.rpartition(".")
        if path.endswith(_MXFP4) and (sc := n.removesuffix("_blocks") + "_scales") in names \
                and len(dims := shape(n)) == 4:  # (blocks: read as the fused tensor they dequantize to)
            f, dims = fused_experts(spec).get(param.removesuffix("_blocks")), fused_shape(dims)
        elif path.endswith(_FUSED) and len(dims := shape(n)) == (2 if param.endswith("_bias") else 3):
            f, sc = fused_experts(spec).get(param), None
        else:
            if path == n and (u := arch.checkpoint_path(n)) != n:  # a transformers name: the checkpoint's instead
                views[u] = _View(n)
            continue
        module = arch.checkpoint_path(module)
        for e in range(dims[0] if f else 0):
            for k, (proj, what) in enumerate(f.parts):
                views[f"{module}.{e}.{proj}.{what}"] = _View(n, e, f.index(k, dims), f.transpose, sc)
    return views


_FUSED = (".experts.gate_up_proj", ".experts.down_proj", ".experts.gate_up_proj_bias", ".experts.down_proj_bias")
_MXFP4 = (".experts.gate_up_proj_blocks", ".experts.down_proj_blocks")  # (gpt-oss's released checkpoints)
