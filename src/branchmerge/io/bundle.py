"""The bundle on disk: a manifest, sharded safetensors, and each branch's HF config and tokenizer.

Layout::

    BUNDLE/
      manifest.json              format version, config, branches, groups, per-tensor records, shard sha256
      merge_config.yaml          the config that produced it
      README.md                  a model card (:mod:`branchmerge.io.card`; documentation, never read back)
      shard-00001.safetensors ...
      branches/NAME/config.json  each branch's HF config, tokenizer and generation config files

Tensor keys inside the shards (``|`` never occurs in HF tensor names):

    g.GROUP|TENSOR|mean     W̄, shared by the group                         [m, n]
    g.GROUP|TENSOR|scales   s_i for the group's branches, in group order    [N] float32
    b.BRANCH|TENSOR|U       U_i                                             [m, k]
    b.BRANCH|TENSOR|V       V_i                                             [k, n]
    b.BRANCH|TENSOR|delta   Ŵ_i − W̄ kept densely                            [m, n]
    b.BRANCH|TENSOR|sigma   quantized factors: singular values σ_i          [k] float32
    b.BRANCH|TENSOR|U.qB    … rows of Ũ_iᵀ at B bits (int8, or int4 packed) [k_B, m_p·B/8]
    b.BRANCH|TENSOR|U.sB    … their group scales                            [k_B, m_p/group] float16
    b.BRANCH|TENSOR|V.qB, V.sB  the same for V_i                             (see compress.quant)
    b.BRANCH|TENSOR         a per-branch tensor (embedding, norm, bias, lm_head; standalone weights)
    g.GROUP|TENSOR          a tensor identical across the group, stored once
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from branchmerge.common import json_dumps, nonfinite
from branchmerge.compress import Difference
from branchmerge.compress.quant import QuantizedFactors, QuantizedRows
from branchmerge.errors import BranchNotFoundError, BundleError
from branchmerge.io.manifest import FORMAT, FORMAT_VERSION, MANIFEST, BranchInfo, GroupInfo, Manifest, parse_manifest
from branchmerge.io.writer import sha256_file

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def key_mean(group: str, tensor: str) -> str:
    return f"g.{group}|{tensor}|mean"


def key_scales(group: str, tensor: str) -> str:
    return f"g.{group}|{tensor}|scales"


def key_shared(group: str, tensor: str) -> str:
    return f"g.{group}|{tensor}"


def key_own(branch: str, tensor: str) -> str:
    return f"b.{branch}|{tensor}"


def key_part(branch: str, tensor: str, part: str) -> str:
    """``part`` is ``U``, ``V``, ``delta``, or a quantized part (``sigma``, ``U.q8``, ``V.s4``…)."""
    return f"b.{branch}|{tensor}|{part}"


class BundleReader:
    """Reads a bundle's manifest (typed and validated, once) and its tensors; verifies every shard's
    sha256 on open by default.

    Raises:
        BundleError: if the folder is not a bundle, its manifest is invalid or of an unknown format
            version, or a shard is missing or fails its checksum.
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise BundleError(f"bundle {self.path} does not exist or is not a folder")
        if not mpath.is_file():
            raise BundleError(f"{self.path} is not a branchmerge bundle: {MANIFEST} is missing")
        try:
            data = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON: {e}") from None
        self.manifest: Manifest = parse_manifest(data, str(mpath))
        self._handles: dict[str, Any] = {}
        self._runtime: dict[str, str] = {}  # branches added in memory (runtime LoRA adapters) → branch they read files of
        self._views: tuple[dict[str, BranchInfo], dict[str, GroupInfo]] | None = None
        for fname, digest in self.manifest.shards.items():
            f = self.path / fname
            if not f.is_file() or f.is_symlink():
                raise BundleError(f"bundle {self.path}: shard {fname} is missing (or not a plain file)")
            if verify:
                actual = sha256_file(f)
                if actual != digest:
                    raise BundleError(
                        f"bundle {self.path}: shard {fname} fails its sha256 check (expected {digest[:12]}…, "
                        f"got {actual[:12]}…): the file is corrupt or was modified"
                    )

    # ---- manifest views -------------------------------------------------------------------------
    @property
    def branches(self) -> dict[str, BranchInfo]:
        return self.manifest.branches if not self._runtime else self._overlay()[0]

    @property
    def groups(self) -> dict[str, GroupInfo]:
        return self.manifest.groups if not self._runtime else self._overlay()[1]

    def _overlay(self) -> tuple[dict[str, BranchInfo], dict[str, GroupInfo]]:
        if self._views is None:
            branches, groups = dict(self.manifest.branches), dict(self.manifest.groups)
            for name, like in self._runtime.items():
                info = branches[like]
                branches[name] = info.model_copy(update={"source": f"runtime adapter over {like}"})
                g = groups[info.group]
                groups[info.group] = g.model_copy(update={"branches": [*g.branches, name]})
            self._views = branches, groups
        return self._views

    def add_runtime_branch(self, name: str, like: str) -> None:
        """A branch held only in memory (a LoRA adapter loaded into a running bundle): it is of ``like``'s
        group and reads ``like``'s files (config, tokenizer, generation config). Never written to disk."""
        self.branch(like)
        if name in self.branches:
            raise BundleError(f"branch {name!r} exists already")
        self._runtime[name] = self._runtime.get(like, like)
        self._views = None

    def remove_runtime_branch(self, name: str) -> None:
        """Forget a branch :meth:`add_runtime_branch` added.

        Raises:
            BundleError: ``name`` is a branch of the bundle on disk (or no branch).
        """
        if name not in self._runtime:
            raise BundleError(f"branch {name!r} was not added at runtime")
        del self._runtime[name]
        self._views = None

    def runtime_branches(self) -> dict[str, str]:
        """Branches added in memory → the branch whose files each reads."""
        return dict(self._runtime)

    def branch(self, name: str) -> BranchInfo:
        """The manifest entry of ``name``.

        Raises:
            BranchNotFoundError: listing the bundle's branches.
        """
        info = self.branches.get(name) if isinstance(name, str) else None
        if info is None:
            raise BranchNotFoundError(f"unknown branch {name!r}; this bundle has: {', '.join(self.branches)}")
        return info

    def branch_dir(self, name: str) -> Path:
        """``BUNDLE/branches/NAME``, whose files (config, tokenizer) are read by transformers.

        Raises:
            BranchNotFoundError: an unknown branch.
            BundleError: the folder, or a file in it, is a symbolic link (it could read files from anywhere).
        """
        self.branch(name)
        name = self._runtime.get(name, name)
        d = self.path / "branches" / name
        links = [p for p in (d.parent, d) if p.is_symlink()]
        if not links and d.is_dir():
            links = [p for p in d.iterdir() if p.is_symlink()]
        if links:
            raise BundleError(f"bundle {self.path}: {links[0]} is a symbolic link; a bundle's files must be plain "
                              "files inside it")
        return d

    def hf_config(self, name: str) -> dict[str, Any]:
        """The branch's HF config, as recorded in the manifest (no disk read)."""
        return self.branch(name).hf_config

    # ---- tensors --------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.manifest.weight_map

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The stored tensor ``key``, checked against what the manifest implies before it is read.

        Raises:
            BundleError: the key is missing from the weight map or its shard, the shard cannot be read, or
                the tensor's shape or dtype is not the one its manifest record implies.
        """
        try:
            fname = self.manifest.weight_map[key]
        except KeyError:
            raise BundleError(f"bundle {self.path}: tensor {key} is missing from the weight map") from None
        try:
            if fname not in self._handles:
                h = safe_open(str(self.path / fname), framework="pt", device="cpu")
                self._handles[fname] = (h, set(h.keys()))
            h, keys = self._handles[fname]
            if key not in keys:
                raise BundleError(f"bundle {self.path}: shard {fname} has no tensor {key} (the weight map names it)")
            meta = h.get_slice(key)
            self._check(key, list(meta.get_shape()), meta.get_dtype())
            t = h.get_tensor(key)
            bad = nonfinite(t)
            if bad:  # a merge refuses to write them: the file was damaged or edited after it was signed
                raise BundleError(f"bundle {self.path}: tensor {key} holds {bad} non-finite value(s) (NaN or "
                                  "Inf); branchmerge never writes them, so the bundle is damaged")
            return t.to(device)
        except SafetensorError as e:
            raise BundleError(f"bundle {self.path}: shard {fname} cannot be read ({key}): {e}") from None

    def _check(self, key: str, shape: list[int], dtype: str) -> None:
        """Raise unless ``key``'s stored ``shape`` and safetensors ``dtype`` (``F32``, ``I8``…) fit its record.

        Quantized parts (``sigma``, ``U.q8``, ``V.s4``…) are checked by :meth:`quantized`.
        """
        head, tensor, *part = key.split("|")
        kind, _, owner = head.partition(".")
        group = owner if kind == "g" else self.branches[owner].group if owner in self.branches else None
        rec = self.manifest.tensors.get(group or "", {}).get(tensor)
        if rec is None:
            raise BundleError(f"bundle {self.path}: tensor {key} has no record in the manifest's `tensors`")
        want: list[int | None] | None = list(rec.shape_of(owner) if kind == "b" else rec.shape)
        floating = bool(part)
        if part == ["scales"]:
            want = [len(self.groups[group].branches)]
        elif part == ["U"] and len(rec.shape) == 2:
            want = [rec.shape[0], rec.rank]
        elif part == ["V"] and len(rec.shape) == 2:
            want = [rec.rank, rec.shape[1]]
        elif part == ["rows"]:  # a patch's row indices: [k] int64 (checked against the rows in `own`)
            want, floating = [None], False
            if dtype != "I64":
                raise BundleError(f"bundle {self.path}: tensor {key} is stored as {dtype}; int64 row indices are "
                                  "expected")
        elif part == ["values"]:  # a patch's rows: [k, n]
            want = [None, *rec.shape_of(owner)[1:]]
        elif part not in ([], ["mean"], ["delta"]):
            want, floating = None, False
        if want is not None and (len(shape) != len(want) or any(w is not None and w != g for w, g in zip(want, shape))):
            shown = ["k" if w is None else w for w in want]
            raise BundleError(f"bundle {self.path}: tensor {key} has shape {shape}; its manifest record implies "
                              f"{shown}")
        if floating and dtype not in _FLOAT_DTYPES:
            raise BundleError(f"bundle {self.path}: tensor {key} is stored as {dtype}; a floating-point type is "
                              "expected")

    def quantized(self, branch: str, tensor: str, device: str | torch.device = "cpu") -> QuantizedFactors | None:
        """The branch's quantized factors of ``tensor`` as stored (on ``device``), or None when they are not
        quantized.

        Raises:
            BundleError: a stored part does not have the shape the manifest's record implies.
        """
        if not self.has(key_part(branch, tensor, "sigma")):
            return None
        rec = self.manifest.tensors[self.branch(branch).group][tensor]
        if rec.bits is None or rec.group_size is None:
            raise BundleError(f"bundle {self.path}: tensor {tensor} of branch {branch!r} has quantized factors but "
                              "its manifest record gives no `bits`/`group_size`")
        m, n = rec.shape
        sigma = self.get(key_part(branch, tensor, "sigma"), device).float()
        parts = []
        for bits, count in rec.bits:
            if count == 0:
                continue
            pair = []
            for f, length in (("U", m), ("V", n)):
                q = self.get(key_part(branch, tensor, f"{f}.q{bits}"), device)
                sc = self.get(key_part(branch, tensor, f"{f}.s{bits}"), device)
                lp = -(-length // rec.group_size) * rec.group_size
                want_q, want_s = [count, lp * bits // 8], [count, lp // rec.group_size]
                if list(q.shape) != want_q or list(sc.shape) != want_s or q.dtype != (
                        torch.int8 if bits == 8 else torch.uint8) or sc.dtype != torch.float16:
                    raise BundleError(f"bundle {self.path}: {key_part(branch, tensor, f + '.q' + str(bits))} has shape "
                                      f"{list(q.shape)} {q.dtype} (scales {list(sc.shape)} {sc.dtype}); the record "
                                      f"implies {want_q} and scales {want_s} float16")
                pair.append(QuantizedRows(q, sc, bits, rec.group_size, length))
            parts.append(tuple(pair))
        if sigma.shape != (rec.rank,):
            raise BundleError(f"bundle {self.path}: {key_part(branch, tensor, 'sigma')} has shape {list(sigma.shape)}, "
                              f"expected [{rec.rank}]")
        return QuantizedFactors(sigma, tuple(parts))

    def difference(self, branch: str, tensor: str) -> Difference:
        """The stored form of ``Ŵ_i − W̄`` for one branch and tensor (quantized factors dequantized, float32)."""
        q = self.quantized(branch, tensor)
        if q is not None:
            u, v = q.dequantize()
            return Difference(u=u, v=v)
        if self.has(key_part(branch, tensor, "delta")):
            return Difference(dense=self.get(key_part(branch, tensor, "delta")))
        if self.has(key_part(branch, tensor, "U")):
            return Difference(u=self.get(key_part(branch, tensor, "U")), v=self.get(key_part(branch, tensor, "V")))
        return Difference()

    def own(self, branch: str, tensor: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """``branch``'s per-branch ``tensor``: stored whole, another branch's copy (``same_as``), or another
        branch's with rows replaced or added (``patches``, checked by :meth:`patch`)."""
        rec = self.manifest.tensors[self.branch(branch).group][tensor]
        got = self.patch(branch, tensor, device)
        if got is None:
            return self.get(key_own(rec.holder(branch), tensor), device)
        of, rows, values = got
        base = self.get(key_own(of, tensor), device)
        out = torch.zeros(rec.shape_of(rec.holder(branch)), dtype=base.dtype, device=base.device)
        out[:base.shape[0]] = base
        out[rows] = values.to(base.dtype)
        return out

    def patch(self, branch: str, tensor: str, device: str | torch.device = "cpu"
              ) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """``(patched branch, rows [k], values [k, n])`` when ``branch``'s ``tensor`` is stored as another
        branch's with some rows replaced or added, else None.

        Raises:
            BundleError: rows that are not sorted, unique and within the branch's rows, or that leave a row past
                the patched branch's end without a value.
        """
        rec = self.manifest.tensors[self.branch(branch).group][tensor]
        h = rec.holder(branch)
        if h not in rec.patches:
            return None
        of = rec.patches[h]
        rows, values = self.get(key_part(h, tensor, "rows"), device), self.get(key_part(h, tensor, "values"), device)
        size, start = rec.shape_of(h)[0], rec.shape_of(of)[0]
        # sorted, unique, in range; the last size − start of them are the added rows (checked only when there
        # are that many: a size from the manifest is never allocated before the stored rows can cover it)
        added = size - start
        if (rows.numel() != values.shape[0] or (rows.numel() and (rows[0] < 0 or rows[-1] >= size))
                or bool((rows[1:] <= rows[:-1]).any()) or rows.numel() < added
                or (added and not torch.equal(rows[rows.numel() - added:], torch.arange(start, size, device=rows.device)))):
            raise BundleError(f"bundle {self.path}: {key_part(h, tensor, 'rows')} must be {values.shape[0]} sorted, "
                              f"unique row indices below {size}, covering rows {start}..{size - 1}")
        return of, rows, values

    def iter_branch_tensors(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_tensor_name, dense float tensor)`` for one branch, one tensor at a time.

        Compressed weights are reconstructed as ``s_i · (W̄ + U_i V_i)`` in float32.
        """
        group = self.branch(name).group
        idx = self.groups[group].branches.index(name)
        for tensor, rec in self.manifest.tensors[group].items():
            role = rec.role
            if role == "compressed":
                mean = self.get(key_mean(group, tensor)).float()
                scale = float(self.get(key_scales(group, tensor))[idx])
                yield tensor, self.difference(name, tensor).apply(mean) * scale
            elif role == "shared":
                yield tensor, self.get(key_shared(group, tensor))
            else:
                yield tensor, self.own(name, tensor)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Validate ``manifest`` as a reader would, then write it."""
    parse_manifest(manifest, f"manifest of {folder}")
    (folder / MANIFEST).write_text(json_dumps(manifest))


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "BundleReader", "write_manifest", "key_mean", "key_own",
           "key_part", "key_scales", "key_shared"]
