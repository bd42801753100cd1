"""HTTP routes over :class:`~.api.OpenAIService`: parse, authenticate, call, answer. Nothing else."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from branchmerge.errors import BranchmergeError
from branchmerge.server import protocol as P
from branchmerge.server.names import listed, model_aliases, renamed
from branchmerge.server.api import PREFIX_CACHE_TOKENS, ClientGone, OpenAIService, Reply, ServerLimits
from branchmerge.server.metrics import HTTPMetrics, Registry
from branchmerge.server.lora import LoadLoraRequest, UnloadLoraRequest
from branchmerge.server.messages import CountTokensRequest, Messages, MessagesRequest, error_body
from branchmerge.server.responses import ResponsesRequest, Responses, ResponseStore
from branchmerge.server.tokens import DetokenizeRequest, TokenizeRequest

logger = logging.getLogger(__name__)
_OPEN_PATHS = ("/health", "/ping")  # answered without the key, and then saying nothing about the bundle
_ROUTES = ("/health", "/ping", "/version", "/metrics", "/v1/models", "/v1/models/{id}",  # metric labels
           "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/responses/{id}", "/v1/messages",
           "/v1/messages/count_tokens", "/tokenize", "/detokenize", "/v1/load_lora_adapter",
           "/v1/unload_lora_adapter")


def create_app(bundle_or_front: Any, *, api_key: str | None = None, max_batch: int = 16, wait_ms: float = 10.0,
               max_tokens_limit: int | None = None, pipelines=None, limits: ServerLimits | None = None,
               route_batch: int = 64, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
               tool_call_parser: str | None = None, lora_dir: str | Path | None = None, max_loras: int = 8,
               max_lora_rank: int = 64, lora_base: str | None = None, lora_on_demand: bool = False,
               generation_config: str = "auto", override_generation_config: dict[str, Any] | None = None,
               allowed_origins: list[str] | None = None, served_model_names: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving a bundle (or a :class:`~branchmerge.front.Front`): one engine thread,
    concurrent requests batched (and their ``auto`` texts routed together, at most ``route_batch`` in one
    embedding batch). With ``api_key`` every path but a bare ``/health`` needs ``Authorization: Bearer KEY``
    and the interactive docs are off. ``prefix_cache_tokens``: finished requests' KV caches kept (in
    tokens, least recently used out first) for later requests that begin the same way; 0 keeps none.
    ``tool_call_parser`` (``"hermes"``): ``tool_choice: "auto"`` answers freely and its calls are read out.
    ``lora_dir``: vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` load PEFT LoRA adapters from
    inside this folder (at most ``max_loras``, of rank ≤ ``max_lora_rank``) over the branch ``lora_base`` (by
    default the bundle's one base branch); with ``lora_on_demand`` a request naming an adapter folder of
    ``lora_dir`` loads it (least recently used ones unloaded when full); see :mod:`branchmerge.server.lora`.
    ``generation_config``: ``"auto"`` (vLLM's default) answers a request that leaves out a sampling setting
    with its branch's generation config's, ``"vllm"`` with the server's own; ``override_generation_config``
    (``{"temperature": 0.5}``) over either (see :meth:`~.api.OpenAIService.defaults`). ``allowed_origins``:
    see :func:`build_app`. ``served_model_names``: other names for served models (``NAME`` or ``NAME=MODEL``,
    :func:`~.names.model_aliases`)."""
    from branchmerge.front import Front, front_for

    front = bundle_or_front if isinstance(bundle_or_front, Front) else front_for(bundle_or_front, pipelines)
    if max_tokens_limit is not None:
        limits = (limits or ServerLimits()).model_copy(update={"max_tokens": max_tokens_limit})
    service = OpenAIService(front, limits=limits, max_batch=max_batch, wait_ms=wait_ms, route_batch=route_batch,
                            prefix_cache_tokens=prefix_cache_tokens, tool_call_parser=tool_call_parser,
                            generation_config=generation_config, override_generation_config=override_generation_config)
    service.aliases = model_aliases(served_model_names or [], front.model_ids())
    if lora_dir is not None:
        from branchmerge.server.lora import RuntimeLoras

        service.loras = RuntimeLoras(service, lora_dir, max_loras=max_loras, max_rank=max_lora_rank,
                                     base=lora_base, on_demand=lora_on_demand)
    app = build_app(service, api_key=api_key, allowed_origins=allowed_origins)
    app.state.engine, app.state.bundle = service.engine, front.bundle
    return app


def build_app(service: Any, *, api_key: str | None = None, title: str = "branchmerge",
              allowed_origins: list[str] | None = None) -> FastAPI:
    """The OpenAI-compatible routes over ``service`` — :class:`~.api.OpenAIService` (``serve``) or
    :class:`~.gateway.GatewayService` (``gateway``): ``limits``, ``models(created)``, ``health(full)``,
    and async ``chat``/``completions(req, disconnected) -> Reply``. One implementation of the API surface
    (auth, body limits, error shapes, streaming) for both. ``allowed_origins`` (vLLM's ``--allowed-origins``;
    ``["*"]`` for any): pages from these origins may call it from a browser (CORS); by default none may."""
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=title, version="1", **docs)
    app.state.service = service
    created = int(time.time())
    registry = Registry()
    http = HTTPMetrics(registry, _ROUTES, service.model_ids)
    if hasattr(service, "register_metrics"):
        service.register_metrics(registry)
    app.state.metrics = registry
    expected = f"Bearer {api_key}".encode() if api_key else None

    def error(e: P.APIError) -> JSONResponse:
        return JSONResponse(status_code=e.status, content=e.body())

    @app.exception_handler(P.APIError)
    async def _api_error(_: Request, e: P.APIError):
        return error(e)

    @app.exception_handler(BranchmergeError)
    async def _user_error(_: Request, e: BranchmergeError):
        return error(P.APIError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        return error(P.invalid(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):  # an unknown path, a body that cannot be parsed
        return JSONResponse(status_code=e.status_code, headers=e.headers,
                            content=P.error_body(str(e.detail), type_="not_found_error" if e.status_code == 404
                                                 else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):  # never the exception's text: it may hold paths or data
        ref = uuid.uuid4().hex[:8]
        logger.exception("internal error %s", ref)
        return error(P.APIError(500, f"internal server error (error id {ref}; see the server log)",
                                type_="server_error"))

    def answer(reply: Reply) -> JSONResponse | StreamingResponse:
        if reply.stream is not None:
            return StreamingResponse(reply.stream, media_type="text/event-stream", headers=reply.headers)
        return JSONResponse(reply.body, headers=reply.headers)

    @app.get("/health")
    async def health(request: Request):
        full = expected is None or hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)
        return await service.health(full)

    def named(req):  # a request's model under another name (--served-model-name) read as that model
        return renamed(req, getattr(service, "aliases", {}))

    def listing() -> dict[str, Any]:
        return listed(service.models(created), getattr(service, "aliases", {}))

    @app.get("/v1/models")
    async def models():
        return listing()

    @app.get("/v1/models/{model:path}")
    async def model(model: str):  # OpenAI's retrieve (client.models.retrieve)
        found = next((m for m in listing()["data"] if m["id"] == model), None)
        if found is None:
            raise P.APIError(404, f"The model {model[:256]!r} does not exist.", type_="not_found_error",
                             param="model", code="model_not_found")
        return found

    @app.get("/version")
    async def version():  # vLLM's
        from branchmerge import __version__

        return {"version": __version__}

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():  # vLLM's (SageMaker's health check): /health's status, nothing more
        out = await service.health(False)
        return JSONResponse({"status": out.get("status")}, status_code=200 if out.get("status") == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(registry.render(), media_type=Registry.CONTENT_TYPE)

    async def run(endpoint, req, request: Request) -> JSONResponse | StreamingResponse:
        req = named(req)
        try:
            reply = await endpoint(req, request.is_disconnected)
            http.answered(req.model, reply.headers.get("X-Branchmerge-Branch", ""))
            return answer(reply)
        except ClientGone:  # nobody reads this; its work was cancelled
            return JSONResponse(status_code=499, content=P.error_body("client closed the request"))

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest, request: Request):
        return await run(service.chat, req, request)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        return await run(service.completions, req, request)

    # OpenAI's Responses API over chat (server/responses.py); stored responses kept in memory
    responses = Responses(service, ResponseStore(service.limits.max_stored_responses))
    app.state.responses = responses
    registry.gauge("stored_responses", "/v1/responses kept in memory for previous_response_id.",
                   read=lambda: {(): len(responses.store)})
    registry.gauge("stored_responses_chars", "Characters (as JSON) of the stored responses and their conversations.",
                   read=lambda: {(): responses.store.chars})

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, request: Request):
        return await run(responses.create, req, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return responses.get(response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str):
        return responses.input_items(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return responses.delete(response_id)

    # Anthropic's Messages API over chat (server/messages.py): errors in Anthropic's shape
    messages = Messages(service)

    async def anthropic(model_cls, request: Request, call):
        try:
            try:
                req = model_cls.model_validate_json(await request.body())
            except ValidationError as e:
                raise P.invalid(e.errors()) from None
            return await call(named(req))
        except BranchmergeError as e:
            return JSONResponse(status_code=400, content=error_body(P.APIError(400, str(e))))
        except P.APIError as e:
            return JSONResponse(status_code=e.status, content=error_body(e))

    @app.post("/v1/messages")
    async def create_message(request: Request):
        return await anthropic(MessagesRequest, request, lambda req: run(messages.create, req, request))

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(request: Request):
        return await anthropic(CountTokensRequest, request, messages.count_tokens)

    if hasattr(service, "tokenize"):  # vLLM's (the gateway passes them to the branch's upstream)
        @app.post("/tokenize")
        async def tokenize(req: TokenizeRequest):
            return await service.tokenize(named(req))

        @app.post("/detokenize")
        async def detokenize(req: DetokenizeRequest):
            return await service.detokenize(named(req))

    if getattr(service, "loras", None) is not None:  # vLLM's runtime LoRA endpoints (serve --lora-dir)
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(req: LoadLoraRequest):
            return PlainTextResponse(await service.loras.load(req))

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(req: UnloadLoraRequest):
            return PlainTextResponse(await service.loras.unload(req))

    app.add_middleware(Guard, expected=expected, limit=service.limits.max_body_bytes, http=http)
    if allowed_origins:  # browsers' pages from these origins may call the API (outside the guard: a preflight
        # carries no key; every answer, a 401 too, carries the CORS headers)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["X-Branchmerge-Branch"])
    return app


def run_uvicorn(app: FastAPI, *, host: str, port: int, ssl_keyfile: str | Path | None = None,
                ssl_certfile: str | Path | None = None, root_path: str = "") -> None:
    """Serve ``app`` (blocking): HTTPS with both files; ``root_path`` when a proxy serves it under a prefix.
    First says what it serves, and where (as vLLM lists its routes)."""
    import uvicorn
    from fastapi.routing import APIRoute

    base = f"{'https' if ssl_certfile else 'http'}://{host}:{port}{root_path}"
    models = app.state.service.model_ids()
    logger.info("serving %d model%s at %s/v1: %s", len(models), "" if len(models) == 1 else "s", base,
                ", ".join(models[:16]) + (f", … ({len(models) - 16} more)" if len(models) > 16 else ""))
    routes = sorted({(r.path, m) for r in app.routes if isinstance(r, APIRoute) for m in r.methods or ()})
    logger.info("routes: %s", ", ".join(f"{m} {p}" for p, m in routes if m != "HEAD"))

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, root_path=root_path,
                ssl_keyfile=None if ssl_keyfile is None else str(ssl_keyfile),
                ssl_certfile=None if ssl_certfile is None else str(ssl_certfile))


def _path(scope) -> str:
    """The request's path within the app (without the ``root_path`` a proxy serves it under)."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root):] or "/" if root and path.startswith(root) else path


async def _send_error(send, e: P.APIError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware in front of every route: the API key (all paths but a bare ``/health``), then the
    body size — a declared ``Content-Length`` past ``limit`` and a chunked body that grows past it both
    get a 413. The body is read first, at most ``limit`` bytes of it held, then handed on; after it the
    app reads the real channel, so a client that goes away is seen (``request.is_disconnected()``).
    (Starlette's ``@app.middleware("http")`` wraps ``receive`` so that a disconnect is never seen.)"""

    def __init__(self, app, expected: bytes | None, limit: int, http: HTTPMetrics | None = None) -> None:
        self.app, self.expected, self.limit, self.http = app, expected, limit, http

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.http is None:
            return await self._guard(scope, receive, send)
        status, t = "none", time.monotonic()

        async def counted(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = str(msg["status"])
            await send(msg)

        try:
            await self._guard(scope, receive, counted)
        finally:  # the request's last byte is out (a stream's too), or it failed
            route = self.http.route(_path(scope))
            self.http.requests.inc(route, status)
            self.http.duration.observe(time.monotonic() - t, route)

    async def _guard(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization") or (b"Bearer " + headers[b"x-api-key"] if b"x-api-key" in headers
                                                   else b"")  # (Anthropic's clients send the key as x-api-key)
        if self.expected is not None and _path(scope) not in _OPEN_PATHS and not hmac.compare_digest(
                given, self.expected):
            return await _send_error(send, P.APIError(401, "invalid or missing API key",
                                                      type_="authentication_error", code="invalid_api_key"))
        too_big = P.APIError(413, f"request body is larger than this server's limit of {self.limit} bytes",
                             code="request_too_large")
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            return await _send_error(send, too_big)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        parts, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                return await _send_error(send, too_big)
            parts.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # then the real channel: a disconnect reaches the app

        await self.app(scope, replay, send)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for serving beyond loopback without a key (None when there is nothing to warn of)."""
    if api_key or host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return None
    return (f"serving on {host} without an API key: anyone who can reach this address can use the bundle; "
            "pass --api-key (or BRANCHMERGE_API_KEY)")


def serve(bundle_dir: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, wait_ms: float = 10.0, device: str = "cpu", dtype: str | None = None,
          pipelines=None, limits: ServerLimits | None = None,
          prefix_cache_tokens: int = PREFIX_CACHE_TOKENS, tool_call_parser: str | None = None,
          lora_dir: str | Path | None = None, max_loras: int = 8, max_lora_rank: int = 64,
          lora_base: str | None = None, lora_on_demand: bool = False, generation_config: str = "auto",
          override_generation_config: dict[str, Any] | None = None,
          chat_templates: dict[str | None, str] | None = None, max_model_len: int | None = None,
          ssl_keyfile: str | Path | None = None, ssl_certfile: str | Path | None = None,
          allowed_origins: list[str] | None = None, root_path: str = "",
          served_model_names: list[str] | None = None) -> None:
    """Load a bundle (or take a loaded :class:`~branchmerge.front.Front`) and serve it with uvicorn
    (blocking); the one entry point the CLI uses. ``chat_templates``: Jinja templates by branch (None: every
    branch), set before serving (:meth:`~branchmerge.runtime.bundle.Bundle.set_chat_template`);
    ``max_model_len``: tokens per row at most (:attr:`~branchmerge.runtime.bundle.Bundle.max_model_len`);
    ``ssl_keyfile``/``ssl_certfile``: serve HTTPS; ``allowed_origins``: CORS (:func:`build_app`);
    ``root_path``: the prefix a proxy serves it under; ``served_model_names``: see :func:`create_app`."""
    from branchmerge.front import Front, open_front

    warning = exposure_warning(host, api_key)
    if warning:
        logger.warning(warning)
    front = bundle_dir if isinstance(bundle_dir, Front) else open_front(bundle_dir, device=device, dtype=dtype,
                                                                        pipelines=pipelines)
    if max_model_len is not None:
        front.bundle.max_model_len = max_model_len
    for branch, template in sorted((chat_templates or {}).items(), key=lambda kv: kv[0] is not None):
        front.bundle.set_chat_template(template, branch)  # (every branch's first, then each branch's own)
    app = create_app(front, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms, limits=limits,
                     prefix_cache_tokens=prefix_cache_tokens, tool_call_parser=tool_call_parser, lora_dir=lora_dir,
                     max_loras=max_loras, max_lora_rank=max_lora_rank, lora_base=lora_base,
                     lora_on_demand=lora_on_demand, generation_config=generation_config,
                     override_generation_config=override_generation_config, allowed_origins=allowed_origins,
                     served_model_names=served_model_names)
    run_uvicorn(app, host=host, port=port, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, root_path=root_path)
