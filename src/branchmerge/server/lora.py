"""vLLM's runtime LoRA endpoints, ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, over a
served bundle (:meth:`~branchmerge.runtime.bundle.Bundle.load_lora`).

On only with ``serve --lora-dir DIR`` (vLLM gates them behind ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``): a
request's ``lora_path`` is read inside DIR only, after every link is resolved, so a client can load what the
operator put there and nothing else. At most ``max_loras`` adapters are loaded at once and none of a rank
over ``max_rank``; loads and unloads run one at a time, off the event loop. Unloading stops taking
requests for the adapter, lets its running ones finish (cancelling them after ``drain_s``), then frees it.

With ``on_demand`` (``--lora-on-demand``, vLLM's filesystem LoRA resolver), a request whose model is no
served name but a folder ``DIR/MODEL`` holding an adapter loads it first; when ``max_loras`` are loaded, the
least recently requested one with no work running (and none asked for in the last ``grace_s``) is unloaded
to make room, else the request gets a 503 to retry.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from branchmerge.errors import BranchmergeError
from branchmerge.io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from branchmerge.runtime.adapters import adapter_bases, base_branches
from branchmerge.server import protocol as P

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a model name that may name a folder of DIR


class LoadLoraRequest(BaseModel):
    """vLLM's ``LoadLoRAAdapterRequest``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = Field(default=False, description="Replace an adapter of this name that is loaded.")
    base: str | None = Field(default=None, max_length=128, description="branchmerge's: the branch the adapter was "
                             "trained on (default: the server's --lora-base).")
    upstream: str | None = Field(default=None, max_length=128, description="The gateway's: the upstream to load it "
                                 "on (default: its one LoRA upstream).")
    samples: list[Annotated[str, Field(min_length=1, max_length=4000)]] | None = Field(
        default=None, min_length=1, max_length=64, description="branchmerge's: representative questions; the "
        "router then sends `auto` questions like them to the adapter.")


class UnloadLoraRequest(BaseModel):
    """vLLM's ``UnloadLoRAAdapterRequest``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None  # (vLLM's; names identify adapters here)


class RuntimeLoras:
    """Loads and unloads adapters of a served bundle for HTTP requests."""

    def __init__(self, service, folder: str | Path, *, max_loras: int = 8, max_rank: int = 64,
                 base: str | None = None, drain_s: float = 30.0, on_demand: bool = False,
                 grace_s: float = 2.0) -> None:
        self.service, self.bundle, self.engine = service, service.bundle, service.engine
        self.root = Path(folder).expanduser().resolve()
        if not self.root.is_dir():
            raise BranchmergeError(f"--lora-dir {folder} is not a folder")
        reader = self.bundle.reader
        if base is None and len(base_branches(reader)) != 1:
            raise BranchmergeError("runtime LoRA loading needs the branch the adapters were trained on: name it "
                                   f"with --lora-base (one of {', '.join(adapter_bases(reader)) or 'none'})")
        if base is not None and base not in adapter_bases(reader):
            raise BranchmergeError(f"--lora-base {base!r} is not a branch adapters can be loaded over "
                                   f"(one of {', '.join(adapter_bases(reader)) or 'none'})")
        self.max_loras, self.max_rank, self.base, self.drain_s = max_loras, max_rank, base, drain_s
        self.on_demand, self.grace_s = on_demand, grace_s
        self._lock = asyncio.Lock()
        self._used: dict[str, float] = {}  # adapter → when a request last named it
        self.pinned = set(self.bundle.loras)  # loaded before serving (--lora-modules): never counted nor evicted
        self.loads = self.unloads = self.evictions = 0

    def register_metrics(self, registry) -> None:
        registry.gauge("lora_adapters_loaded", "LoRA adapters loaded at runtime now.",
                       read=lambda: {(): len(self.bundle.loras)})
        registry.counter("lora_loads_total", "LoRA adapters loaded at runtime (on request or on demand).",
                         read=lambda: {(): self.loads})
        registry.counter("lora_unloads_total", "LoRA adapters unloaded (on request or evicted).",
                         read=lambda: {(): self.unloads})
        registry.counter("lora_evictions_total", "LoRA adapters unloaded to make room for one requested "
                         "on demand.", read=lambda: {(): self.evictions})

    def count(self) -> int:
        """Adapters loaded at runtime (those loaded before serving aside)."""
        return len(set(self.bundle.loras) - self.pinned)

    def touch(self, name: str) -> None:
        """A request named ``name``: it is the most recently used adapter."""
        if name in self.bundle.loras:
            self._used[name] = time.monotonic()

    async def demand(self, name: str) -> bool:
        """Load the adapter ``DIR/name`` for a request naming it (on demand only), evicting the least recently
        used idle one when full. False when ``name`` is no adapter folder there.

        Raises:
            APIError: 400 for a bad adapter, 503 when every slot is busy.
        """
        if not self.on_demand or not _NAME.match(name) or name in (".", ".."):
            return False
        try:
            folder = self._folder(name)
        except P.APIError:
            return False
        async with self._lock:
            if name not in self.bundle.loras:
                await self._load(name, folder, "model", evict=True)
        self.touch(name)
        return True

    async def _evict(self) -> None:
        now = time.monotonic()
        idle = [n for n in self.bundle.loras if n not in self.pinned and not self.engine.uses(n)
                and now - self._used.get(n, 0) > self.grace_s]
        if not idle:
            raise P.APIError(503, f"all {self.max_loras} adapter slots (--max-loras) are in use; retry later",
                             type_="server_error", code="server_busy")
        victim = min(idle, key=lambda n: self._used.get(n, 0))
        logger.info("evicting adapter %r (least recently used) to make room", victim)
        await self._unload(victim)
        self.evictions += 1

    def _folder(self, raw: str) -> Path:
        """``raw`` (relative to the LoRA folder, or absolute) as an adapter folder inside it, links resolved.

        Raises:
            APIError: 400 for a path outside the folder or no adapter folder.
        """
        if "\x00" in raw:
            raise P.APIError(400, "lora_path holds a NUL character", param="lora_path")
        p = Path(raw).expanduser()
        real = (p if p.is_absolute() else self.root / p).resolve()
        files = [real, (real / ADAPTER_CONFIG).resolve(), (real / ADAPTER_WEIGHTS).resolve()]
        if any(f != self.root and not f.is_relative_to(self.root) for f in files):
            raise P.APIError(400, f"lora_path {raw!r} is outside this server's LoRA folder (--lora-dir)",
                             param="lora_path")
        if not (real / ADAPTER_CONFIG).is_file():
            raise P.APIError(400, f"lora_path {raw!r} is not a PEFT adapter folder (no {ADAPTER_CONFIG})",
                             param="lora_path")
        return real

    async def load(self, req: LoadLoraRequest) -> str:
        if req.upstream is not None:
            raise P.APIError(400, "`upstream` is the gateway's field; this server loads adapters itself",
                             param="upstream")
        folder = self._folder(req.lora_path)
        if req.samples is not None and self.bundle.router is None:
            raise P.APIError(400, "samples route `auto` questions, but this bundle has no router", param="samples")
        async with self._lock:
            if req.lora_name not in self.bundle.loras and (req.lora_name in self.service.front.model_ids()
                                                           or req.lora_name in getattr(self.service, "aliases", {})):
                raise P.APIError(400, f"the name {req.lora_name!r} is taken (a branch, a pipeline, 'auto' or a "
                                 "--served-model-name)", param="lora_name")
            if req.lora_name in self.bundle.loras:
                if not req.load_inplace:
                    raise P.APIError(400, f"The lora adapter '{req.lora_name}' has already been loaded.",
                                     param="lora_name")
                await self._unload(req.lora_name)
            if self.count() >= self.max_loras:
                raise P.APIError(400, f"{self.count()} adapters are loaded, this server's limit "
                                 f"(--max-loras); unload one first", param="lora_name")
            await self._load(req.lora_name, folder, "lora_path", base=req.base)
            if req.samples is not None:
                try:
                    await asyncio.to_thread(self.bundle.router.add_branch, req.lora_name, req.samples)
                except Exception:  # (the adapter goes again: a load is all or nothing)
                    await self._unload(req.lora_name)
                    raise
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def _load(self, name: str, folder: Path, param: str, *, evict: bool = False, base: str | None = None) -> None:
        """Read and check the adapter, make room (``evict``: once it proved good), then add it."""
        t = time.monotonic()
        try:
            prep = await asyncio.to_thread(self.bundle.read_lora, name, folder, base=base or self.base,
                                           max_rank=self.max_rank)
            if evict and self.count() >= self.max_loras:
                await self._evict()
            got = await asyncio.to_thread(self.bundle.add_lora, prep)
        except BranchmergeError as e:
            raise P.APIError(400, str(e), param=param) from None
        self.loads += 1
        self._used[name] = time.monotonic()
        logger.info("loaded adapter %r from %s in %.2f s (rank %d)", got.name, folder, time.monotonic() - t, got.rank)

    async def unload(self, req: UnloadLoraRequest) -> str:
        async with self._lock:
            if req.lora_name not in self.bundle.loras:
                raise P.APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name",
                                 code="model_not_found")
            await self._unload(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    async def _unload(self, name: str) -> None:
        """Stop taking work for ``name`` (and routing to it), let its jobs end (cancelled after ``drain_s``), then
        free it."""
        self.bundle.retiring.add(name)
        if self.bundle.router is not None:
            self.bundle.router.remove_branch(name)
        try:
            end = time.monotonic() + self.drain_s
            while self.engine.uses(name) and time.monotonic() < end:
                await asyncio.sleep(0.05)
            if self.engine.uses(name):
                logger.warning("unloading adapter %r: cancelling its %d unfinished jobs", name, self.engine.uses(name))
                self.engine.cancel_branch(name)
                while self.engine.uses(name):
                    await asyncio.sleep(0.02)
            await asyncio.to_thread(self._free, name)
            self.unloads += 1
            self._used.pop(name, None)
            self.pinned.discard(name)
        finally:
            self.bundle.retiring.discard(name)

    def _free(self, name: str) -> None:
        with self.bundle.weights_lock:  # (the engine's prefix cache is used only under this lock)
            self.bundle.unload_lora(name)
            if self.engine.prefix is not None:
                self.engine.prefix.forget(name)
