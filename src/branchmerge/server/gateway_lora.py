"""vLLM's runtime LoRA endpoints through the gateway: ``POST /v1/load_lora_adapter`` goes to an upstream that
takes adapters (``lora: true``: vLLM with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, or ``branchmerge serve
--lora-dir``), and once it has loaded the adapter, the gateway routes that model name there;
``/v1/unload_lora_adapter`` undoes both. Names the gateway serves already (branches, pipelines, ``auto``)
are refused; the path is the upstream's to check (it reads its own files)."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple


from branchmerge.common import check_name
from branchmerge.server import protocol as P
from branchmerge.server.lora import LoadLoraRequest, UnloadLoraRequest


class Route(NamedTuple):
    """Where the gateway sends a loaded adapter's requests (as a config's ``BranchRoute``)."""

    upstream: str
    model: str


class GatewayLoras:
    """Loads and unloads adapters on the gateway's LoRA upstreams; the names they serve join its routes."""

    def __init__(self, service) -> None:
        self.service = service
        self.upstreams = [n for n, u in service.cfg.upstreams.items() if u.lora]
        self._lock = asyncio.Lock()

    def _upstream(self, named: str | None) -> str:
        if named is not None:
            if named not in self.upstreams:
                raise P.APIError(400, f"upstream {named!r} does not take adapters; those that do (`lora: true`): "
                                 f"{', '.join(self.upstreams)}", param="upstream")
            return named
        if len(self.upstreams) != 1:
            raise P.APIError(400, "name the `upstream` to load the adapter on: one of "
                             f"{', '.join(self.upstreams)}", param="upstream")
        return self.upstreams[0]

    async def _call(self, upstream: str, path: str, body: dict[str, Any]) -> str:
        u = self.service.up[upstream]
        r, text = await u.exchange(path, body)
        if r.status_code != 200:
            raise u.status_error(r, text)
        return text

    async def load(self, req: LoadLoraRequest) -> str:
        try:
            check_name(req.lora_name, "lora_name")
        except ValueError as e:
            raise P.APIError(400, str(e), param="lora_name") from None
        dynamic = self.service.dynamic
        async with self._lock:
            known = req.lora_name in dynamic
            if req.lora_name in self.service.model_ids() and not (known and req.load_inplace):
                raise P.APIError(400, f"the name {req.lora_name!r} is taken (a branch, a pipeline, 'auto' or a loaded "
                                 "adapter)", param="lora_name")
            upstream = dynamic[req.lora_name].upstream if known else self._upstream(req.upstream)
            router = self.service.router  # (with one, the gateway routes `auto` itself: the samples stay here)
            body = req.model_dump(exclude={"upstream", *(["samples"] if router is not None else [])},
                                  exclude_none=True)
            text = await self._call(upstream, "/load_lora_adapter", body)
            dynamic[req.lora_name] = Route(upstream, req.lora_name)
            if req.samples is not None and router is not None:
                router.remove_branch(req.lora_name)
                await asyncio.to_thread(router.add_branch, req.lora_name, req.samples)
        return text

    async def unload(self, req: UnloadLoraRequest) -> str:
        dynamic = self.service.dynamic
        async with self._lock:
            route = dynamic.get(req.lora_name)
            if route is None:
                raise P.APIError(404, f"The lora adapter '{req.lora_name}' cannot be found (adapters loaded through "
                                 f"this gateway: {', '.join(dynamic) or 'none'})", param="lora_name",
                                 code="model_not_found")
            try:
                text = await self._call(route.upstream, "/unload_lora_adapter", {"lora_name": req.lora_name})
            except P.APIError as e:
                if e.status != 404:  # (gone upstream already, a restart say: forget it here too)
                    raise
                text = f"Success: LoRA adapter '{req.lora_name}' removed successfully."
            del dynamic[req.lora_name]
            if self.service.router is not None:
                self.service.router.remove_branch(req.lora_name)
        return text
