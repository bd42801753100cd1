"""``branchmerge gateway``: the OpenAI API in front of OpenAI-compatible backends (vLLM, ``branchmerge
serve``, any other), keeping what they lack — the training-free router and the staged pipelines.

Each branch maps to an upstream (``base_url``, the model name there, an optional key); ``auto`` routes
with a bundle's stored router (the gateway loads what the router needs: its embedder — the bundle, when
the router embeds with one of its branches — and serves no weights itself); a
pipeline runs its stages across upstreams; streaming passes through; an upstream's error or timeout
comes back as an OpenAI error naming the upstream; each upstream has a concurrency limit::

    # gateway.yaml (export-vllm writes one)
    upstreams:
      vllm: {base_url: http://127.0.0.1:8000/v1, max_concurrency: 32, timeout_s: 120}
      small: {base_url: http://10.0.0.7:8001/v1, api_key_env: SMALL_KEY}
    branches:
      medical: {upstream: vllm}                 # model name at the upstream: the branch name
      coding: {upstream: vllm, model: code-lora}
      chat: {upstream: small}
    router: ./bundle          # a bundle with a stored router, for model "auto" (optional)
    pipelines: ./pipelines.yaml   # optional; default: the router bundle's pipelines.yaml

The HTTP routes are :func:`~branchmerge.server.app.build_app`'s, shared with ``branchmerge serve``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from branchmerge.common import check_name
from branchmerge.config import read_yaml, validate
from branchmerge.errors import BranchmergeError, ConfigError
from branchmerge.server import protocol as P
from branchmerge.server.api import Disconnected, Reply, ServerLimits
from branchmerge.server.gateway_lora import GatewayLoras, Route
from branchmerge.server.gateway_tokens import GatewayTokenReplies
from branchmerge.server.metrics import SIZE_BUCKETS, Family, Registry
from branchmerge.server.routing import RouteBatcher
from branchmerge.server.upstream import Upstream, UpstreamConfig
from branchmerge.staged import ExtractTimeoutError, PipelinesConfig, fill, load_pipelines, postprocess

logger = logging.getLogger(__name__)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BranchRoute(_Frozen):
    upstream: str
    model: str | None = Field(default=None, description="Model name at the upstream (default: the branch name).")


# a request's fields that give its answer's structure (OpenAI's and vLLM's), passed on with a pipeline's last stage
STRUCTURE_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                    "guided_grammar")


class GatewayConfig(_Frozen):
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    branches: dict[str, BranchRoute] = Field(min_length=1)
    router: str | None = Field(default=None, description="Bundle folder whose stored router serves model 'auto'.")
    pipelines: str | None = Field(default=None, description="pipelines.yaml (default: the router bundle's).")
    limits: ServerLimits = Field(default_factory=ServerLimits)

    @model_validator(mode="after")
    def _check(self) -> GatewayConfig:
        for name in [*self.upstreams, *self.branches]:
            check_name(name, "name")
        for b, r in self.branches.items():
            if r.upstream not in self.upstreams:
                raise ValueError(f"branches.{b}.upstream: {r.upstream!r} is not in `upstreams` "
                                 f"({', '.join(self.upstreams)})")
        if "auto" in self.branches:
            raise ValueError("`auto` is reserved for routing; rename that branch")
        return self


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read a gateway YAML; relative ``router``/``pipelines`` paths are relative to its folder."""
    path = Path(path)
    data = read_yaml(path, "gateway config")
    cfg = validate(GatewayConfig, data, str(path))
    upd = {k: str((path.parent / v).resolve()) for k, v in (("router", cfg.router), ("pipelines", cfg.pipelines))
           if v and not Path(v).expanduser().is_absolute()}
    return cfg.model_copy(update=upd) if upd else cfg


def _count(usage: dict[str, Any], key: str) -> int:
    """A token count from an upstream's ``usage`` (0 when it is missing or not a count)."""
    v = usage.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class GatewayService(GatewayTokenReplies):
    """The API surface of :func:`~branchmerge.server.app.build_app` over upstreams (no local model)."""

    def __init__(self, cfg: GatewayConfig, *, router: Any = None, pipelines: PipelinesConfig | None = None) -> None:
        self.cfg, self.limits, self.router = cfg, cfg.limits, router
        self.pipelines = pipelines or PipelinesConfig()
        self.pipelines.check_branches(list(cfg.branches))
        self.up = {n: Upstream(n, u) for n, u in cfg.upstreams.items()}
        self._pool = ThreadPoolExecutor(1, "gateway-route")
        self._routes = RouteBatcher(lambda texts: router.route(texts), self._pool,
                                    cached=lambda text: router.cached(text) if hasattr(router, "cached") else None)
        self._tokens: tuple[Family, Family] | None = None  # prompt and generated tokens by branch, on /metrics
        self.dynamic: dict[str, Route] = {}  # adapters loaded on upstreams through the gateway
        self.loras = GatewayLoras(self) if any(u.lora for u in cfg.upstreams.values()) else None

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> GatewayService:
        """Load the router (its embedder) and pipelines the config names."""
        router, pipes = None, None
        if cfg.router:
            import branchmerge

            bundle = branchmerge.load(cfg.router)
            router = bundle.router
            if router is None:
                raise ConfigError(f"{cfg.router} has no stored router (build one with `branchmerge router build`)")
            unknown = sorted(set(router.branches) - set(cfg.branches))
            if unknown:
                raise ConfigError(f"the router at {cfg.router} picks branch(es) {unknown} that `branches` does not map "
                                  "to an upstream")
            if cfg.pipelines is None and (Path(cfg.router) / "pipelines.yaml").is_file():
                pipes = load_pipelines(Path(cfg.router) / "pipelines.yaml")
        if cfg.pipelines:
            pipes = load_pipelines(cfg.pipelines)
        return cls(cfg, router=router, pipelines=pipes)

    def register_metrics(self, registry: Registry) -> None:
        """Each upstream's requests in flight and its errors by code, on ``/metrics``."""
        registry.gauge("upstream_in_flight", "Requests in flight to each upstream.", ("upstream",),
                       read=lambda: {(n,): u.in_flight for n, u in self.up.items()})
        errors = registry.counter("upstream_errors_total", "Upstream failures by upstream and code.",
                                  ("upstream", "code"))
        for u in self.up.values():
            u.errors = errors
        self._routes.sizes = registry.histogram("route_batch_size", "Texts per routing batch (model auto).",
                                                buckets=SIZE_BUCKETS)
        self._tokens = (registry.counter("prompt_tokens_total", "Prompt tokens by branch, as upstreams report "
                                         "them in `usage` (a stream's only with include_usage).", ("branch",)),
                        registry.counter("generation_tokens_total", "Tokens generated by branch, as upstreams "
                                         "report them in `usage`.", ("branch",)))

    def _count_usage(self, branch: str, usage: Any) -> None:
        """Add an upstream answer's ``usage`` to the token counters (nothing when it is not a usage)."""
        if self._tokens is None or not isinstance(usage, dict):
            return
        for fam, key in zip(self._tokens, ("prompt_tokens", "completion_tokens")):
            if 0 < (n := _count(usage, key)) < 1 << 40:  # an upstream's absurd count is not added
                fam.inc(branch, by=n)

    # ---- listing and health -------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [*self.cfg.branches, *self.dynamic, *(p.name for p in self.pipelines.pipelines),
                *(["auto"] if self.router else [])]

    def models(self, created: int) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created,
                                            "owned_by": "branchmerge-gateway"} for i in self.model_ids()]}

    async def _probe(self, u: Upstream) -> dict[str, Any]:
        try:
            r = await u.client.get("/models", timeout=2.0)
            ok, err = r.status_code == 200, None if r.status_code == 200 else f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            ok, err = False, type(e).__name__
        return {"ok": ok, "error": err, "base_url": u.cfg.base_url, "in_flight": u.in_flight,
                "branches": [b for b, r in self.cfg.branches.items() if r.upstream == u.name]}

    async def health(self, full: bool) -> dict[str, Any]:
        states = dict(zip(self.up, await asyncio.gather(*(self._probe(u) for u in self.up.values()))))
        status = "ok" if all(s["ok"] for s in states.values()) else "degraded"
        return {"status": status, "upstreams": states} if full else {"status": status}

    # ---- resolving ----------------------------------------------------------------------------------
    async def _resolve(self, model: str, text: str) -> tuple[str | None, str | None]:
        """(branch, pipeline) for a model name; ``auto`` routes (then a routing rule may pick a pipeline)."""
        if model == "auto":
            if self.router is None:
                raise P.APIError(400, "model 'auto' needs a router; this gateway has none", param="model")
            try:
                branch = await self._routes.route(text)  # batched with other requests' texts
            except BranchmergeError as e:
                raise P.APIError(400, str(e)) from None
            return branch, self.pipelines.routes.get(branch)
        if model in self.cfg.branches or model in self.dynamic:
            return model, None
        if self.pipelines.get(model) is not None:
            return None, model
        raise P.APIError(404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids())}",
                         param="model", code="model_not_found")

    def _check(self, req: P._Req, text: str, param: str) -> None:
        if req.max_new() is not None:  # unset: the upstream's default
            self.limits.check_max_tokens(req.max_new())
        self.limits.check_chars(text, param)

    # ---- calling upstreams --------------------------------------------------------------------------
    def _target(self, branch: str) -> tuple[Upstream, str]:
        r = self.cfg.branches.get(branch) or self.dynamic[branch]
        return self.up[r.upstream], r.model or branch

    async def _post(self, branch: str, path: str, body: dict[str, Any], disconnected: Disconnected | None,
                    key: str = "choices", what: str = "an OpenAI answer") -> dict[str, Any]:
        """POST to the branch's upstream (``path`` under its base_url, or a URL); its JSON answer, holding ``key``
        (see :meth:`Upstream.exchange` for the limits)."""
        u, name = self._target(branch)
        r, text = await u.exchange(path, {**body, "model": name}, disconnected)
        out = u.answer(r, text, key, what)
        out["branch"] = branch
        self._count_usage(branch, out.get("usage"))
        return out

    def _relabel(self, line: str, model: str, branch: str) -> str:
        """A stream event as the client asked for it: ``model`` its own name (not the upstream's, say a LoRA
        module's), and the ``branch`` that answers, as in a non-streamed answer. Other lines pass as sent."""
        if not line.startswith("data:"):
            return line
        try:
            event = json.loads(line[5:])
        except ValueError:  # [DONE], or something the client may make sense of
            return line
        if not isinstance(event, dict) or "choices" not in event:
            return line
        if event["choices"] == []:  # the usage event that ends a stream with include_usage (vLLM's
            self._count_usage(branch, event.get("usage"))  # continuous usage stats would count twice)
        return P.sse({**event, "model": model, "branch": branch}).rstrip("\n")

    async def _stream(self, branch: str, path: str, body: dict[str, Any], model: str) -> AsyncIterator[str]:
        """Open the upstream stream (errors before the first byte become API errors) and pass it through."""
        u, name = self._target(branch)
        await u.acquire()
        try:
            req = u.client.build_request("POST", path, json={**body, "model": name, "stream": True})
            r = await u.client.send(req, stream=True)
        except httpx.HTTPError as e:
            u.release()
            raise u.error(e) from None
        if r.status_code != 200:
            try:
                text = await u.body(r)
            finally:
                await r.aclose()
                u.release()
            raise u.status_error(r, text)

        async def events() -> AsyncIterator[str]:
            try:
                async for line in u.lines(r):
                    yield self._relabel(line, model, branch) + "\n\n"
            except (httpx.HTTPError, P.APIError) as e:  # the upstream died or misbehaved mid-stream: an error
                err = e if isinstance(e, P.APIError) else u.error(e)  # event, then the end
                yield P.sse({"error": err.body()["error"]})
                yield P.DONE
            finally:  # also when our client went away: closing stops the upstream's work
                await r.aclose()
                u.release()

        return events()

    # ---- endpoints ----------------------------------------------------------------------------------
    async def _pipeline(self, name: str, question: str, model: str, kind: str, disconnected: Disconnected | None,
                        structure: dict[str, Any] | None = None, live: bool = False, usage: bool = False
                        ) -> dict[str, Any] | tuple[str, AsyncIterator[str]]:
        """Run a pipeline's stages one after the other, each on its branch's upstream. ``structure``: the
        request's structure fields, sent with the last stage in place of its own (whose stop and extract are
        then left out), as the bundle server does. With ``live`` (a streamed request) the answer is an event
        stream, with the branch that answers: the last stage's, passed through as its upstream writes it (unless
        its ``extract`` must see its whole output: then it comes as one chunk); ``usage``: it ends with the
        usage of every stage."""
        pipe = self.pipelines.get(name)
        previous, stages, pt, ct, reason = "", [], 0, 0, "stop"
        for k, st in enumerate(pipe.stages, 1):
            branch = (await self._resolve("auto", question))[0] if st.branch == "auto" else st.branch
            msgs = ([{"role": "system", "content": fill(st.system, question, previous)}] if st.system else []) + [
                {"role": "user", "content": fill(st.user, question, previous)}]
            given = structure is not None and k == len(pipe.stages)
            body = {"messages": msgs, "max_tokens": st.max_tokens, "temperature": st.temperature,
                    **({"stop": st.stop} if st.stop and not given else {}),
                    **(structure if given else {"structured_outputs": st.structured_outputs}
                       if st.structured_outputs else {})}
            if live and k == len(pipe.stages) and (given or not st.extract):
                if usage:
                    body["stream_options"] = {"include_usage": True}
                return branch, self._stage_events(await self._stream(branch, "/chat/completions", body, model),
                                                  kind, pt, ct)
            out = await self._post(branch, "/chat/completions", body, disconnected)
            reason = self._finish_reason(out)
            try:  # off the event loop: an extract regex may take up to its time limit
                previous = await asyncio.to_thread(postprocess, self._text(branch, out), st, raw=given)
            except ExtractTimeoutError as e:
                raise P.APIError(500, str(e), type_="server_error", code="extract_timeout") from None
            used = out.get("usage") if isinstance(out.get("usage"), dict) else {}
            pt = pt or _count(used, "prompt_tokens")
            ct += _count(used, "completion_tokens")
            stages.append({"stage": k, "branch": branch, "text": previous})
        res = P.body(kind, P.new_id(kind), model, [(previous, reason)], pt, ct, stages[-1]["branch"])
        res["stages"] = stages
        if live:  # (a last stage with `extract`: its answer as one chunk)
            return res["branch"], self._whole_events(res, kind, usage)
        return res

    @staticmethod
    async def _stage_events(events: AsyncIterator[str], kind: str, pt: int, ct: int) -> AsyncIterator[str]:
        """A pipeline's last stage streamed (chat chunks from its upstream, relabelled) as the client's ``kind``
        of stream: leading whitespace left out, as a stage's answer is stripped; the usage event, if any,
        counting the stages before (their completion tokens, the first stage's prompt)."""
        started = False
        async for line in events:
            try:
                event = json.loads(line[len("data: "):]) if line.startswith("data: {") else None
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("choices"), list):
                yield line
                continue
            if event["choices"] == [] and isinstance(event.get("usage"), dict):
                u = event["usage"]
                done = _count(u, "completion_tokens") + ct
                event["usage"] = {"prompt_tokens": pt or _count(u, "prompt_tokens"), "completion_tokens": done,
                                  "total_tokens": (pt or _count(u, "prompt_tokens")) + done}
            for ch in event["choices"]:
                delta = ch.get("delta") if isinstance(ch, dict) and isinstance(ch.get("delta"), dict) else {}
                text = delta.get("content") if isinstance(delta.get("content"), str) else None
                if text is not None and not started:
                    text = text.lstrip()
                    started = bool(text)
                    if text:
                        delta["content"] = text
                    else:
                        delta.pop("content", None)
                if kind != "chat" and isinstance(ch, dict):
                    reason = ch.get("finish_reason")
                    ch.clear()
                    ch.update({"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None})
            if kind != "chat":
                event["object"] = "text_completion"
            yield P.sse(event)

    @staticmethod
    async def _whole_events(res: dict[str, Any], kind: str, usage: bool) -> AsyncIterator[str]:
        """A pipeline's whole answer as an event stream: one text chunk, the finish reason (and the usage)."""
        ch = res["choices"][0]
        text = ch["message"]["content"] if kind == "chat" else ch["text"]
        yield P.chunk(kind, res["id"], res["model"], text, None, res["branch"], first=True)
        yield P.chunk(kind, res["id"], res["model"], None, ch["finish_reason"], res["branch"])
        if usage:
            yield P.sse({"id": res["id"], "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                         "created": res["created"], "model": res["model"], "choices": [], "usage": res["usage"]})
        yield P.DONE

    @staticmethod
    def _finish_reason(out: dict[str, Any]) -> str:
        """An upstream answer's first finish reason, when it is one of OpenAI's (else ``stop``)."""
        try:
            reason = out["choices"][0]["finish_reason"]
        except (LookupError, TypeError):
            return "stop"
        return reason if reason in ("stop", "length", "content_filter") else "stop"

    def _text(self, branch: str, out: dict[str, Any]) -> str:
        """The text of a chat answer's first choice (a 502 naming the upstream when there is none)."""
        try:
            text = out["choices"][0]["message"]["content"]
            assert text is None or isinstance(text, str)
        except (LookupError, TypeError, AssertionError):
            raise self._target(branch)[0].bad_response("a chat answer without a text first choice") from None
        return text or ""

    async def _answer(self, req: P._Req, kind: str, text: str, body: dict[str, Any],
                      disconnected: Disconnected | None) -> Reply:
        branch, pipeline = await self._resolve(req.model, text)
        path = "/chat/completions" if kind == "chat" else "/completions"
        if pipeline is not None:
            if req.n > 1:
                raise P.APIError(400, f"pipeline {pipeline!r} answers one choice (n=1)", param="n")
            if getattr(req, "tools", None):
                raise P.APIError(400, f"tools are not supported with pipeline {pipeline!r} through the gateway; "
                                      "name a branch", param="tools")
            given = {k: body[k] for k in STRUCTURE_FIELDS if body.get(k) is not None}
            if given:
                P.checked_structure(req)  # a bad or doubled structure: a 400 here, before any stage runs
            usage = bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)
            out = await self._pipeline(pipeline, text, req.model, kind, disconnected, given or None, live=req.stream,
                                       usage=usage)
            if isinstance(out, dict):
                return Reply(body=out, headers=P.branch_header(out["branch"]))
            return Reply(stream=out[1], headers=P.branch_header(out[0]))
        if req.stream:
            return Reply(stream=await self._stream(branch, path, body, req.model), headers=P.branch_header(branch))
        out = await self._post(branch, path, body, disconnected)
        out["model"] = req.model
        return Reply(body=out, headers=P.branch_header(branch))

    async def chat(self, req: P.ChatRequest, disconnected: Disconnected | None = None) -> Reply:
        if not req.messages:
            raise P.APIError(400, "messages must be a non-empty list", param="messages")
        self._check(req, "".join(m.text() for m in req.messages), "messages")
        last_user = next((m.text() for m in reversed(req.messages) if m.role == "user"), req.messages[-1].text())
        body = req.model_dump(exclude_unset=True, exclude={"model"})
        return await self._answer(req, "chat", last_user, body, disconnected)

    async def completions(self, req: P.CompletionRequest, disconnected: Disconnected | None = None) -> Reply:
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        if len(prompts) > self.limits.max_prompts:
            raise P.APIError(400, f"{len(prompts)} prompts; this gateway takes at most {self.limits.max_prompts}",
                             param="prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise P.APIError(400, "the gateway takes text prompts (token ids depend on the upstream's tokenizer)",
                             param="prompt")
        if len(prompts) * req.n > self.limits.max_choices:
            raise P.APIError(400, f"{len(prompts)} prompts × n={req.n} is more than this gateway's "
                                  f"{self.limits.max_choices} choices per request", param="n")
        for p in prompts:
            self._check(req, p, "prompt")
        base = req.model_dump(exclude_unset=True, exclude={"model", "prompt"})
        if len(prompts) == 1:
            return await self._answer(req, "text", prompts[0], {**base, "prompt": prompts[0]}, disconnected)
        if req.stream:
            raise P.APIError(400, "streaming takes one prompt", param="stream")
        replies = await asyncio.gather(*(self._answer(req, "text", p, {**base, "prompt": p}, disconnected)
                                         for p in prompts))
        out = P.merge_bodies([r.body for r in replies])
        return Reply(body=out, headers=P.branch_header(out["branch"]))

    async def aclose(self) -> None:
        await asyncio.gather(*(u.client.aclose() for u in self.up.values()))
        self._pool.shutdown(wait=False, cancel_futures=True)


def gateway(config: str | Path, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
            ssl_keyfile: str | Path | None = None, ssl_certfile: str | Path | None = None,
            allowed_origins: list[str] | None = None, root_path: str = "") -> None:
    """Load ``config`` and serve the gateway with uvicorn (blocking); HTTPS with ``ssl_keyfile``/``ssl_certfile``,
    CORS for ``allowed_origins``, under a proxy's ``root_path``."""
    from branchmerge.server.app import build_app, exposure_warning, run_uvicorn

    warning = exposure_warning(host, api_key)
    if warning:
        logger.warning(warning)
    service = GatewayService.from_config(load_gateway_config(config))
    run_uvicorn(build_app(service, api_key=api_key, title="branchmerge gateway", allowed_origins=allowed_origins),
                host=host, port=port, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, root_path=root_path)
