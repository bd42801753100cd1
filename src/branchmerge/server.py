"""An OpenAI-compatible server over a bundle: routes, gathers concurrent requests into mixed-branch
batches, streams server-sent events exactly as the OpenAI API does.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.
The model name is a branch, a pipeline, or ``auto`` (the router). The answering branch is returned in
each response (``branch`` field and ``X-Branchmerge-Branch`` header).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers.generation.streamers import BaseStreamer

from branchmerge.errors import BranchmergeError

logger = logging.getLogger(__name__)


# ---- request schemas ----------------------------------------------------------------------------
class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    user: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict))
        return self.content or ""


class ChatRequest(_Req):
    messages: list[Message]


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}})


# ---- batching engine ----------------------------------------------------------------------------
@dataclass
class Job:
    ids: list[int]
    branch: str
    max_tokens: int
    sample: tuple[bool, float, float]  # do_sample, temperature, top_p
    stop: list[str]
    stream: queue.Queue | None = None  # token ids as they come (None at the end)
    done: threading.Event = field(default_factory=threading.Event)
    new_ids: list[int] = field(default_factory=list)
    stop_id: int | None = None  # end-of-sequence token that ended generation (not in new_ids)
    error: Exception | None = None
    score: tuple[int, bool] | None = None  # a scoring job: (top-k, greedy next token); no generation
    scored: Any = None  # its TokenLogprobs

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one batch."""
        return ("score", *self.score) if self.score is not None else ("generate", *self.sample)


class _RowStreamer(BaseStreamer):
    """Receives each decoding step's ``[B]`` token ids and forwards each row's id to its job."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs, self.first = jobs, True

    def put(self, value) -> None:
        if self.first:  # the prompt ids come first
            self.first = False
            return
        for job, t in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if job.stream is not None:
                job.stream.put(t)

    def end(self) -> None:
        pass


class Engine:
    """One worker thread; requests waiting together run as one mixed-branch ``generate`` call."""

    def __init__(self, bundle, *, max_batch: int = 16, wait_ms: float = 10.0) -> None:
        self.bundle, self.max_batch, self.wait = bundle, max_batch, wait_ms / 1000
        self.q: queue.Queue[Job] = queue.Queue()
        self.batches = 0
        # the bundle's models are not thread-safe (a branch selector is shared state): every use of them,
        # generation here and routing or pipelines elsewhere, holds this lock
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="branchmerge-engine")
        self._thread.start()

    def submit(self, job: Job) -> Job:
        self.q.put(job)
        return job

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            jobs, pending = [first], []
            deadline = time.monotonic() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    j = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                (jobs if j.key == first.key else pending).append(j)
            for j in pending:
                self.q.put(j)
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        if jobs[0].score is not None:
            return self._score(jobs)
        do_sample, temperature, top_p = jobs[0].sample
        kw: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {}
        try:
            streamer = _RowStreamer(jobs) if any(j.stream is not None for j in jobs) else None
            with self.lock:
                outs = self.bundle.generate_ids([j.ids for j in jobs], [j.branch for j in jobs],
                                                max_new_tokens=max(j.max_tokens for j in jobs), streamer=streamer,
                                                **kw)
            for j, o in zip(jobs, outs):
                j.new_ids = o.new_ids[: j.max_tokens]
                j.stop_id = o.stop_id if len(o.new_ids) < j.max_tokens else None
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            logger.exception("generation failed")
            for j in jobs:
                j.error = e
        for j in jobs:
            if j.stream is not None:
                j.stream.put(None)
            j.done.set()


    def _score(self, jobs: list[Job]) -> None:
        """Scoring jobs (same top-k and greedy flag): one right-padded mixed-branch forward."""
        top, greedy = jobs[0].score
        try:
            with self.lock:
                outs = self.bundle.token_logprobs_many([j.ids for j in jobs], [j.branch for j in jobs],
                                                       top=top, greedy_next=greedy)
            for j, o in zip(jobs, outs):
                j.scored = o
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            logger.exception("scoring failed")
            for j in jobs:
                j.error = e
        for j in jobs:
            j.done.set()


# ---- the app ------------------------------------------------------------------------------------
def create_app(bundle, *, api_key: str | None = None, max_batch: int = 16, wait_ms: float = 10.0,
               max_tokens_limit: int = 2048, pipelines=None) -> FastAPI:
    """Build the FastAPI app serving ``bundle`` (one engine thread; concurrent requests batched)."""
    from branchmerge.staged import bundle_pipelines

    pipes = pipelines if pipelines is not None else bundle_pipelines(bundle)
    engine = Engine(bundle, max_batch=max_batch, wait_ms=wait_ms)
    app = FastAPI(title="branchmerge", version="1")
    app.state.engine, app.state.bundle = engine, bundle
    created = int(time.time())
    lock = engine.lock  # routing and pipelines use the models too

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(BranchmergeError)
    async def _user_error(_: Request, e: BranchmergeError):
        return APIError(400, str(e)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in err["loc"] if x != "body")
        msg = err["msg"] if err.get("type") != "json_invalid" else "request body is not valid JSON"
        return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None).response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if got != f"Bearer {api_key}":
                return APIError(401, "invalid or missing API key", type_="authentication_error",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "branches": bundle.branch_names, "batches": engine.batches}

    @app.get("/v1/models")
    async def models():
        ids = [*bundle.branch_names, *(p.name for p in pipes.pipelines)]
        if bundle.router is not None:
            ids.append("auto")
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "branchmerge"}
                                           for i in ids]}

    def _limits(req: _Req, *, scoring: bool = False) -> int:
        """Validated ``max_tokens``. A scoring request (logprobs/echo) defaults to OpenAI's 16 and may ask
        for 0 new tokens with ``echo`` (score the prompt only)."""
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if mt is None:
            mt = 16 if scoring else min(256, max_tokens_limit)
        if scoring and (mt < 0 or (mt == 0 and not getattr(req, "echo", False))):
            raise APIError(400, f"max_tokens must be positive (0 only with echo), got {mt}", param="max_tokens")
        if not scoring and mt <= 0:
            raise APIError(400, f"max_tokens must be positive, got {mt}", param="max_tokens")
        if mt > max_tokens_limit:
            raise APIError(400, f"max_tokens {mt} is above this server's limit of {max_tokens_limit}", param="max_tokens")
        if req.n > 1 and scoring:
            raise APIError(400, f"n={req.n} is supported without logprobs and echo", param="n")
        return mt

    async def _resolve(model: str, text: str) -> tuple[str | None, str | None]:
        """(branch, pipeline) for a request's model name; routing runs off the event loop."""
        if pipes.get(model) is not None:
            return None, model
        if model == "auto":
            if bundle.router is None:
                raise APIError(400, "model 'auto' needs a router; this bundle has none", param="model",
                               code="model_not_found")
            def pick() -> str:
                with lock:
                    return bundle.router.route([text])[0]

            b = await asyncio.get_running_loop().run_in_executor(None, pick)
            if b in pipes.routes:
                return None, pipes.routes[b]
            return b, None
        if model not in bundle.branch_names:
            raise APIError(404, f"the model {model!r} does not exist; available: "
                                f"{', '.join([*bundle.branch_names, *(p.name for p in pipes.pipelines), 'auto'])}",
                           param="model", code="model_not_found")
        return model, None

    def _encode_chat(branch: str, messages: list[Message]) -> list[int]:
        tok = bundle.tokenizer(branch)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        if tok.chat_template:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return tok("\n".join(m["content"] for m in msgs if m["content"]))["input_ids"]

    def _job(branch: str, ids: list[int], req: _Req, mt: int, stream: bool) -> Job:
        limit = bundle.reader.hf_config(branch).get("max_position_embeddings")
        if limit and len(ids) + mt > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has "
                                f"{len(ids)} tokens and max_tokens is {mt}", param="messages",
                           code="context_length_exceeded")
        t = req.temperature or 0.0
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return Job(ids, branch, mt, (t > 0, t, req.top_p or 1.0), stop, queue.Queue() if stream else None)

    async def _wait(job: Job) -> Job:
        await asyncio.get_running_loop().run_in_executor(None, job.done.wait)
        if job.error is not None:
            what = "scoring" if job.score else "generation"
            raise APIError(500, f"{what} failed: {job.error}", type_="server_error")
        return job

    def _finish(branch: str, new_ids: list[int], job: Job) -> tuple[str, str]:
        text = bundle.tokenizer(branch).decode(new_ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in job.stop if s and s in text), default=-1)
        if cut >= 0:
            return text[:cut], "stop"
        return text, "length" if len(new_ids) >= job.max_tokens else "stop"

    async def _pipeline(name: str, question: str) -> tuple[str, list[dict], int, int]:
        from branchmerge.staged import run_pipeline

        def work():
            with lock:
                return run_pipeline(bundle, pipes.get(name), [question])[0]

        try:
            stages = await asyncio.get_running_loop().run_in_executor(None, work)
        except BranchmergeError as e:
            raise APIError(400, str(e)) from None
        info = [{"stage": s.stage, "branch": s.branch, "text": s.text} for s in stages]
        return stages[-1].text, info, stages[0].prompt_tokens, sum(s.completion_tokens for s in stages)

    def _branch_header(branches: str | list[str]) -> dict[str, str]:
        """``X-Branchmerge-Branch``: the answering branch, or the distinct ones of several choices."""
        return {"X-Branchmerge-Branch": ",".join(dict.fromkeys([branches] if isinstance(branches, str) else branches))}

    def _json(body: dict) -> JSONResponse:
        return JSONResponse(body, headers=_branch_header(body["branch"]))

    async def _handle(req: _Req, kind: str, text: str, encode, *, rid: str | None = None,
                      index: int = 0) -> dict | tuple[str, list[AsyncIterator[str]]]:
        """One prompt: the response body, or with ``req.stream`` its branch and one event stream per choice
        (choice indices from ``index``)."""
        mt = _limits(req)
        branch, pipeline = await _resolve(req.model, text)
        rid = rid or ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if pipeline is not None:
            if req.n > 1:
                raise APIError(400, f"n={req.n} is not supported for pipeline {pipeline!r}", param="n")
            final, stages, pt, ct = await _pipeline(pipeline, text)
            answered = stages[-1]["branch"]
            body = _body(kind, rid, obj, req.model, final, "stop", pt, ct, answered)
            body["stages"] = stages
            if req.stream:
                return answered, [_once(kind, rid, req.model, final, answered, index)]
            return body
        ids = encode(branch)
        if req.stream:
            jobs = [engine.submit(_job(branch, ids, req, mt, True)) for _ in range(req.n)]
            return branch, [_stream(kind, rid, req.model, branch, j, index + k) for k, j in enumerate(jobs)]
        # n completions: n jobs of the same prompt, batched together by the engine
        jobs = await asyncio.gather(*(_wait(engine.submit(_job(branch, ids, req, mt, False))) for _ in range(req.n)))
        outs = [_finish(branch, j.new_ids, j) for j in jobs]
        body = _body(kind, rid, obj, req.model, *outs[0], len(ids), sum(len(j.new_ids) for j in jobs), branch)
        body["choices"] = [{**body["choices"][0], **_content(kind, text), "finish_reason": reason, "index": k}
                           for k, (text, reason) in enumerate(outs)]
        return body

    def _content(kind: str, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}

    def _body(kind, rid, obj, model, text, reason, pt, ct, branch) -> dict:
        choice = {"index": 0, **_content(kind, text), "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}, "branch": branch}

    def _chunk(kind, rid, model, delta: str | None, reason: str | None, branch: str, first: bool = False,
               index: int = 0) -> str:
        if kind == "chat":
            d: dict[str, Any] = {}
            if first:
                d["role"] = "assistant"
            if delta:
                d["content"] = delta
            choice = {"index": index, "delta": d, "finish_reason": reason, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        return "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                                      "choices": [choice], "branch": branch}) + "\n\n"

    async def _once(kind, rid, model, text, branch, index: int) -> AsyncIterator[str]:
        yield _chunk(kind, rid, model, text, None, branch, first=True, index=index)
        yield _chunk(kind, rid, model, None, "stop", branch, index=index)

    def _sse(parts: list[tuple[str, list[AsyncIterator[str]]]]) -> StreamingResponse:
        """One event stream from the choices' streams, chunks interleaved as they come, then ``[DONE]``."""
        gens = [g for _, gs in parts for g in gs]

        async def merged() -> AsyncIterator[str]:
            q: asyncio.Queue[str | None] = asyncio.Queue()

            async def pump(g: AsyncIterator[str]) -> None:
                try:
                    async for c in g:
                        await q.put(c)
                finally:
                    await q.put(None)

            tasks = [asyncio.create_task(pump(g)) for g in gens]
            left = len(tasks)
            while left:
                c = await q.get()
                if c is None:
                    left -= 1
                else:
                    yield c
            yield "data: [DONE]\n\n"

        return StreamingResponse(merged(), media_type="text/event-stream",
                                 headers=_branch_header([b for b, _ in parts]))

    async def _stream(kind, rid, model, branch, job: Job, index: int = 0) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        tok = bundle.tokenizer(branch)
        eos = bundle.stop_ids(branch)
        sent, ids, reason = "", [], None
        yield _chunk(kind, rid, model, None, None, branch, first=True, index=index)
        while True:
            t = await loop.run_in_executor(None, job.stream.get)
            if t is None:
                break
            if reason is not None:
                continue  # drain the rest of the batch's steps
            if t in eos:
                reason = "stop"
                continue
            ids.append(t)
            text = tok.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in job.stop if s and s in text), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if len(ids) >= job.max_tokens and reason is None:
                reason = "length"
            if len(text) > len(sent) and not text.endswith("\ufffd"):
                yield _chunk(kind, rid, model, text[len(sent):], None, branch, index=index)
                sent = text
        if job.error is not None:
            yield "data: " + json.dumps({"error": {"message": str(job.error), "type": "server_error"}}) + "\n\n"
        yield _chunk(kind, rid, model, None, reason or "stop", branch, index=index)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        last_user = next((m.text() for m in reversed(req.messages) if m.role == "user"), req.messages[-1].text())
        if not last_user.strip():
            raise APIError(400, "the last user message is empty", param="messages")
        out = await _handle(req, "chat", last_user, lambda b: _encode_chat(b, req.messages))
        return _sse([out]) if isinstance(out, tuple) else _json(out)

    def _token_ids(branch: str, ids: list[int]) -> list[int]:
        vocab = bundle.reader.hf_config(branch).get("vocab_size")
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary of branch {branch!r} "
                                f"(size {vocab})", param="prompt")
        return list(ids)

    async def _scored(req: CompletionRequest, prompt: str | list[int]) -> dict:
        """A completion with ``logprobs`` and/or ``echo`` (how lm-evaluation-harness scores loglikelihoods):
        generate as usual, then one forward over prompt + completion gives every token's log-probability."""
        if req.stream:
            raise APIError(400, "logprobs and echo are not supported with stream=true", param="stream")
        mt = _limits(req, scoring=True)
        branch, pipeline = await _resolve(req.model, prompt if isinstance(prompt, str) else "")
        if pipeline is not None or branch is None:
            raise APIError(400, "logprobs and echo need a branch, not a pipeline", param="model")
        tok = bundle.tokenizer(branch)
        ids = _token_ids(branch, prompt) if isinstance(prompt, list) else tok(prompt)["input_ids"]
        job = _job(branch, ids, req, mt, False)  # checks the context length before any model work
        text, reason, new_ids = "", "length", []
        # one greedy token (lm-evaluation-harness's loglikelihood requests): a single forward pass scores the
        # prompt and picks the token; otherwise generate as usual, then score prompt + completion
        one_greedy = mt == 1 and not (req.temperature or 0.0) > 0
        if mt > 0 and not one_greedy:
            await _wait(engine.submit(job))
            (text, reason), new_ids = _finish(branch, job.new_ids, job), job.new_ids
            if job.stop_id is not None:  # the end-of-sequence token is scored too, as vLLM does
                new_ids = [*new_ids, job.stop_id]

        scoring = Job(ids + new_ids, branch, 0, (False, 0.0, 1.0), [], score=(req.logprobs or 0, one_greedy))
        sc = (await _wait(engine.submit(scoring))).scored  # batched with concurrent scoring requests
        if one_greedy:
            nxt = sc.token_ids[-1]
            stopped = nxt in bundle.stop_ids(branch)  # scored, but not part of the text
            text, reason = _finish(branch, [] if stopped else [nxt], job)
            reason, new_ids = "stop" if stopped else reason, [nxt]
        start = 0 if req.echo else len(ids)
        pieces = [tok.decode([t]) for t in sc.token_ids[start:]]
        offsets = list(accumulate(map(len, pieces), initial=0))[:-1]
        logprobs = None if req.logprobs is None else {
            "tokens": pieces, "token_logprobs": sc.logprobs[start:], "text_offset": offsets,
            "top_logprobs": [None if t is None else {tok.decode([i]): v for i, v in t} for t in sc.top[start:]]}
        rid = "cmpl-" + uuid.uuid4().hex[:24]
        out = ((prompt if isinstance(prompt, str) else tok.decode(ids)) + text) if req.echo else text
        body = _body("completion", rid, "text_completion", req.model, out, reason, len(ids), len(new_ids), branch)
        body["choices"][0]["logprobs"] = logprobs
        return body

    def _prompts(prompt, auto: bool) -> list[str | list[int]]:
        """A request's prompts: one text, one list of token ids, or a list of either (OpenAI's batch form)."""
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = list(prompt) if many else [prompt]
        for i, p in enumerate(prompts):
            where = f"prompt[{i}]" if many else "prompt"
            if (isinstance(p, list) and not p) or (isinstance(p, str) and not p.strip()):
                raise APIError(400, f"{where} must not be empty", param="prompt")
            if isinstance(p, list) and auto:
                raise APIError(400, f"{where} is token ids, which need a branch name as the model, not 'auto'",
                               param="model")
        return prompts

    async def _completion(req: CompletionRequest, prompt: str | list[int], **where) -> dict | tuple:
        if req.logprobs is not None or req.echo:
            return await _scored(req, prompt)
        if isinstance(prompt, list):
            return await _handle(req, "completion", "", lambda b: _token_ids(b, prompt), **where)
        return await _handle(req, "completion", prompt, lambda b: bundle.tokenizer(b)(prompt)["input_ids"], **where)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = _prompts(req.prompt, req.model == "auto")
        if len(prompts) == 1:
            out = await _completion(req, prompts[0])
            return _sse([out]) if isinstance(out, tuple) else _json(out)
        if req.stream:  # every prompt's n choices in one event stream, indexed prompt by prompt
            rid = "cmpl-" + uuid.uuid4().hex[:24]
            return _sse([await _completion(req, p, rid=rid, index=i * req.n) for i, p in enumerate(prompts)])
        # every prompt is its own job; the engine batches them (and scoring shares their common prefixes)
        bodies = await asyncio.gather(*(_completion(req, p) for p in prompts))
        merged = dict(bodies[0])
        merged["choices"] = [{**c, "index": i, "branch": b["branch"]}
                             for i, (b, c) in enumerate((b, c) for b in bodies for c in b["choices"])]
        merged["usage"] = {k: sum(b["usage"][k] for b in bodies) for k in bodies[0]["usage"]}
        merged["branch"] = [b["branch"] for b in bodies]
        return _json(merged)

    return app


def serve(bundle_dir: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, wait_ms: float = 10.0, device: str = "cpu", dtype: str | None = None) -> None:
    """Load a bundle and serve it with uvicorn (blocking)."""
    import uvicorn

    import branchmerge

    bundle = branchmerge.load(bundle_dir, device=device, dtype=dtype)
    app = create_app(bundle, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="info")
