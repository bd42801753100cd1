"""Writing outputs safely: shards written as they fill, whole folders renamed into place at the end."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from branchmerge.common import nonfinite
from branchmerge.errors import BranchmergeError, ModelInputError

logger = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


MARKER = ".branchmerge-output"  # in every folder atomic_output_dir writes: what --force may replace


def _ours(path: Path) -> bool:
    """``path`` is a folder that ``--force`` may replace: one branchmerge wrote (its marker, or a bundle's
    manifest from before markers), or an empty one. Never a file, a link or a folder of other things."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / MARKER).is_file() or (path / "manifest.json").is_file() or not any(path.iterdir())


def claim_output(path: str | Path) -> None:
    """Declare ``path`` replaceable by ``force``: for a caller that owns it (a fixed name inside its own
    working folder, as the demo's and the benchmarks' outputs), so that one written before markers existed
    is replaced like any earlier output. Nothing happens when it does not exist."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink() and not (p / MARKER).exists():
        (p / MARKER).write_text("claimed by branchmerge; `--force` may replace this folder\n")


def _describe(path: Path) -> str:
    if path.is_symlink() or not path.is_dir():
        return "a link" if path.is_symlink() else "a file"
    names = sorted(p.name for p in path.iterdir())
    return f"a folder that branchmerge did not write (it holds {', '.join(names[:3])}{', …' if names[3:] else ''})"


def check_output(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = (),
                 owned_only: bool = True) -> Path:
    """Check that ``out`` may be written (and, with ``force``, replaced); returns it resolved.

    With ``owned_only`` (every user-named output), ``force`` replaces only a folder that branchmerge wrote,
    or an empty one: a typo such as ``-o merge.yaml --force`` must not delete the config, nor
    ``-o ~/models --force`` a folder of other work.

    Raises:
        BranchmergeError: ``out`` exists without ``force``, or with it is not a folder branchmerge wrote;
            or replacing it would delete an input, the current folder, the home folder or a filesystem root.
    """
    path = Path(out).expanduser().resolve()
    for src in inputs:
        p = Path(src).expanduser()
        if p.exists() and _contains(path, p.resolve()):
            raise BranchmergeError(f"output {out} is or contains the input {src}: writing there would destroy "
                                   "the input; choose another output folder")
    if _contains(path, Path.cwd().resolve()) or path in (Path.home().resolve(), Path(path.anchor)):
        raise BranchmergeError(f"output {out} is the current folder, the home folder or one of their parents; "
                               "choose a new folder (e.g. -o ./bundle)")
    if path.exists() or path.is_symlink():
        if not force:
            raise BranchmergeError(f"output folder {out} already exists; pass --force to replace it")
        if owned_only and not _ours(path):
            raise BranchmergeError(f"output {out} is {_describe(path)}; --force replaces only an earlier branchmerge "
                                   "output or an empty folder: choose another output, or remove it yourself")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folders left by a killed run (its PID is gone)."""
    removed = []
    for p in parent.glob(f".{glob.escape(name)}.*-*-*"):
        kind, _, rest = p.name[len(name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
            logger.info("removed %s, left by an interrupted run", p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = (),
                      owned_only: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out`` only if the block succeeds.

    On any exception (SIGTERM included, turned into one while the block runs in the main thread) the
    temporary folder is removed, so no half-written output is left behind; folders left by a run that
    was killed outright are removed by the next run writing the same output. The result gets the
    user's umask, not the temporary folder's 0700.

    Raises:
        BranchmergeError: see :func:`check_output`.
    """
    path = check_output(out, force=force, inputs=inputs, owned_only=owned_only)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    with _sigterm_as_exception():
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / MARKER).write_text("written by branchmerge; `--force` may replace this folder\n")
        _apply_umask(tmp)
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            tmp.rename(path)


def _apply_umask(folder: Path) -> None:
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            Path(root, d).chmod(0o777 & ~mask)
        for f in files:
            Path(root, f).chmod(0o666 & ~mask)


class _Terminated(BranchmergeError):
    """SIGTERM arrived while an output was being written."""


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise _Terminated("terminated (SIGTERM): the partial output was removed")

    try:
        prev = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


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
        if bad := nonfinite(t):
            hint = " (its values overflow float16's range of ±65504: use dtype bfloat16 or float32)" \
                if t.dtype == torch.float16 else ""
            raise ModelInputError(f"tensor {name} would be stored with {bad} "
                                  f"non-finite value(s) as {str(t.dtype).removeprefix('torch.')}{hint}")
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
