"""A bundle described as plain data (branches, groups, ranks, bytes vs the inputs, reconstruction errors,
each branch's generation defaults): what ``branchmerge inspect`` prints and a model card (:mod:`.card`)
shows. Read from the manifest, and each branch's small generation config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from branchmerge.common import DTYPES
from branchmerge.errors import BranchmergeError
from branchmerge.io.bundle import BundleReader
from branchmerge.io.generation_config import honored_config, sampling_defaults

MAX_GENERATION_CONFIG_BYTES = 1 << 20  # a generation_config.json larger than this is not read here


def generation_summary(reader: BundleReader, branch: str) -> dict[str, Any]:
    """What ``branch``'s generation config makes of a request (see :mod:`.generation_config`): its sampling
    ``defaults``, the fields generation ``ignored``, and the ``error`` that makes the runtime refuse it."""
    try:
        path = reader.branch_dir(branch) / "generation_config.json"
        if not path.is_file():
            return {"defaults": {}, "ignored": [], "error": None}
        if path.stat().st_size > MAX_GENERATION_CONFIG_BYTES:
            raise ValueError(f"{path.name} has over {MAX_GENERATION_CONFIG_BYTES >> 20} MiB")
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"{path.name} is not a JSON object")
        _, ignored = honored_config(values, reader.hf_config(branch).get("vocab_size"), path.name)
        return {"defaults": sampling_defaults(values, path.name), "ignored": ignored, "error": None}
    except (ValueError, OSError, BranchmergeError) as e:
        return {"defaults": {}, "ignored": [], "error": str(e)}


def summarize(bundle: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Branches, groups, ranks, bytes vs the inputs and reconstruction errors, as plain data."""
    reader = BundleReader(bundle, verify=verify)
    m = reader.manifest
    groups = {}
    for gname, g in m.groups.items():
        recs = m.tensors[gname]
        comp = {k: r for k, r in recs.items() if r.role == "compressed"}
        errors = {b: max((r.rel_error.get(b, 0.0) for r in comp.values()), default=0.0) for b in g.branches}
        mean_err = {
            b: (sum(r.rel_error.get(b, 0.0) for r in comp.values()) / len(comp)) if comp else 0.0
            for b in g.branches
        }
        ranks = sorted({r.rank for r in comp.values() if r.rank is not None})
        groups[gname] = {
            "branches": g.branches,
            "architecture": g.architecture,
            "standalone": g.standalone,
            "lora_base": g.lora_base,
            "tensors": len(recs),
            "compressed": len(comp),
            "shared": sum(r.role == "shared" for r in recs.values()),
            "per_branch": sum(r.role == "per_branch" for r in recs.values()),
            "deduplicated": sum(bool(r.same_as or r.patches) for r in recs.values()),  # stored once or as rows
            "dense_deltas": sum(r.dense for r in comp.values()),
            "ranks": ranks,
            "bytes": sum(r.bytes for r in recs.values()),
            "max_rel_error": errors,
            "mean_rel_error": mean_err,
            "input_bytes": sum(m.branches[b].source_bytes for b in g.branches),
            "vocab_sizes": {b: m.branches[b].hf_config.get("vocab_size") for b in g.branches},
            "factor_bits": sorted({b for r in comp.values() for b, c in (r.bits or []) if c}) or [16],
            "tensor_records": {k: {"role": r.role, "shape": r.shape, "rank": r.rank, "dense": r.dense,
                                   "bits": r.bits, "bytes": r.bytes,
                                   "max_rel_error": max(r.rel_error.values(), default=None),
                                   **({"shapes": r.shapes} if r.shapes else {})}
                               for k, r in recs.items()},
        }
    input_bytes = sum(b.source_bytes for b in m.branches.values())
    at_dtype = sum(b.source_params for b in m.branches.values()) * DTYPES[m.dtype].itemsize
    return {
        "path": str(reader.path),
        "format_version": m.format_version,
        "dtype": m.dtype,
        "compress_rate": m.config.get("compress_rate"),
        "branches": {n: {"group": b.group, "standalone": b.standalone, "source": b.source,
                         "generation": generation_summary(reader, n)} for n, b in m.branches.items()},
        "groups": groups,
        "bundle_bytes": m.total_bytes,
        "input_bytes": input_bytes,
        "ratio": m.total_bytes / input_bytes if input_bytes else None,
        "input_bytes_at_dtype": at_dtype,  # the inputs stored as the bundle stores them (float32 → bf16 is 2×)
        "ratio_at_dtype": m.total_bytes / at_dtype if at_dtype else None,
        "shards": len(m.shards),
        "allocation": m.allocation,
    }
