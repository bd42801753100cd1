"""Does a bundle load? Run at the end of every merge, before the bundle is renamed into place."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from branchmerge.errors import BranchmergeError, BundleError
from branchmerge.io.bundle import BundleReader

logger = logging.getLogger(__name__)


def check_shapes(reader: BundleReader) -> None:
    """Cheap check at any size: each group's model skeleton (on the meta device, no memory) built from its
    config, and every stored tensor's shape equal to the parameter or buffer it fills."""
    from branchmerge.architectures import registry
    from branchmerge.io.skeleton import hf_config_object, skeleton
    from branchmerge.runtime.experts import per_expert_shapes

    for gname, g in reader.groups.items():
        arch = registry().get(g.architecture)
        records = reader.manifest.tensors[gname]
        paths = {t: arch.param_path(t) if arch is not None else t for t in records}  # (as the runtime reads them)
        for b in g.branches:
            model = skeleton(hf_config_object(reader.hf_config(b), f"branch {b!r}"), where=f"branch {b!r}")
            shapes = {n: list(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
            if arch is not None and arch.experts:  # the checkpoint's per-expert tensors
                shapes |= per_expert_shapes(model, arch, list(paths.values()))
            for tensor, rec in records.items():
                path = paths[tensor]
                if path not in shapes:
                    raise BundleError(f"branch {b!r}: tensor {tensor} is not a parameter of {type(model).__name__}")
                if shapes[path] != rec.shape_of(b):
                    raise BundleError(f"branch {b!r}: tensor {tensor} has shape {rec.shape_of(b)} but its config makes "
                                      f"it {shapes[path]} (does config.json match the weights?)")


def check_bundle_loads(path: str | Path, *, forward_max_bytes: int = 2 << 30) -> None:
    """:func:`check_shapes`; then, if the bundle's weights take at most ``forward_max_bytes`` in float32,
    load every group on the CPU and run one forward of a two-token input per branch, checking the
    logits' shape and that they are finite.

    Raises:
        BundleError: naming the branch and what failed.
    """
    from branchmerge.runtime.bundle import Bundle

    reader = BundleReader(path, verify=False)
    check_shapes(reader)
    m = reader.manifest
    if m.total_bytes * (2 if m.dtype != "float32" else 1) > forward_max_bytes:
        logger.info("bundle %s: shapes checked; too large for a test forward on the CPU", path)
        return
    try:
        bundle = Bundle(path, dtype="float32", verify=False)
    except BranchmergeError as e:
        raise BundleError(f"the merged bundle does not load: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure here means the bundle would not run
        raise BundleError(f"the merged bundle does not load ({type(e).__name__}: {e})") from None
    for name in bundle.branch_names:
        vocab = bundle.reader.hf_config(name).get("vocab_size") or 2
        x = torch.tensor([[0, min(1, vocab - 1)]])
        try:
            logits = bundle.logits(x, [name])
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"branch {name!r} of the merged bundle fails a forward pass "
                              f"({type(e).__name__}: {e})") from None
        if logits.shape[:2] != (1, 2) or not bool(torch.isfinite(logits).all()):
            raise BundleError(f"branch {name!r} of the merged bundle gives {list(logits.shape)} logits, "
                              "or non-finite ones")
    logger.debug("checked: %s loads and runs every branch", path)
