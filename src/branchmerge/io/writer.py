"""Writing outputs safely: shards written as they fill, whole folders renamed into place at the end."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from branchmerge.errors import BranchmergeError

logger = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_output_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out`` only if the block succeeds.

    On any exception the temporary folder is removed, so no half-written output is left behind.

    Raises:
        BranchmergeError: if ``out`` exists and ``force`` is false.
    """
    out = Path(out)
    if out.exists() and not force:
        raise BranchmergeError(f"output folder {out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class ShardWriter:
    """Buffers tensors and writes a safetensors shard each time ``max_shard_bytes`` is reached.

    Peak memory is bounded by one shard plus whatever the caller holds, not by model size.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 1 << 30, prefix: str = "shard") -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.shards: dict[str, str] = {}  # file name -> sha256
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._buffer:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = t
        self._buffer_bytes += nbytes

    def flush(self) -> None:
        if not self._buffer:
            return
        fname = f"{self.prefix}-{len(self.shards) + 1:05d}.safetensors"
        path = self.folder / fname
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self.shards[fname] = sha256_file(path)
        self.total_bytes += self._buffer_bytes
        for k in self._buffer:
            self.weight_map[k] = fname
        logger.debug("wrote %s (%d tensors, %.1f MB)", fname, len(self._buffer), self._buffer_bytes / 1e6)
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> None:
        self.flush()


def copy_side_files(files: dict[str, Path], dest: Path) -> list[str]:
    """Copy tokenizer/generation-config files into ``dest``; returns the names copied."""
    dest.mkdir(parents=True, exist_ok=True)
    for fname, src in files.items():
        shutil.copyfile(src, dest / fname)
    return sorted(files)
