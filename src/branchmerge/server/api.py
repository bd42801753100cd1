"""The API surface, written once and free of HTTP: :class:`OpenAIService` answers validated OpenAI
requests over a :class:`~branchmerge.front.Front` and an :class:`~.engine.Engine`. The FastAPI routes
(:mod:`.app`) are a thin layer over it; a gateway or another front end can call it directly."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from branchmerge.errors import BranchmergeError, BranchNotFoundError
from branchmerge.front import Front
from branchmerge.runtime.bundle import ContextLengthError, GenerationResult
from branchmerge.io.generation_config import SAMPLING_FIELDS, sampling_defaults
from branchmerge.runtime.sampling import RowSettings
from branchmerge.runtime.structured import Structure
from branchmerge.runtime.text import bad_word_ids, cut_at_stop, min_tokens_start
from branchmerge.server import protocol as P
from branchmerge.server.engine import Busy, Engine, Job
from branchmerge.server.metrics import SIZE_BUCKETS, EngineMetrics, Registry
from branchmerge.server.routing import RouteBatcher
from branchmerge.server.scored import ScoringReplies
from branchmerge.server.streams import ClientGone, Reply, StreamReplies, _Request, stream_calls
from branchmerge.server.tokens import TokenReplies
from branchmerge.server.tools import PARSERS, answer_calls

logger = logging.getLogger(__name__)
Disconnected = Callable[[], Awaitable[bool]]


class ServerLimits(BaseModel):
    """What one request may ask for, so that one client cannot starve the rest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=2048, ge=1, description="Largest max_tokens accepted.")
    max_prompts: int = Field(default=64, ge=1, description="Prompts in one request (OpenAI's batch form).")
    max_choices: int = Field(default=128, ge=1, description="Prompts × n in one request.")
    max_prompt_chars: int = Field(default=100_000, ge=1, description="Characters of one prompt or conversation.")
    max_body_bytes: int = Field(default=4 << 20, ge=1024, description="Size of a request body.")
    max_queued: int = Field(default=4096, ge=1, description="Jobs waiting in the engine, all requests together.")
    max_stored_responses: int = Field(default=1024, ge=0, description="/v1/responses kept in memory for "
                                      "previous_response_id and GET (least recently used out first; 0: none).")

    def check_chars(self, text: str, param: str) -> None:
        """Raises an API error when ``text`` (named ``param``) is longer than ``max_prompt_chars``."""
        if len(text) > self.max_prompt_chars:
            raise P.APIError(400, f"{param} has {len(text)} characters; this server takes at most "
                                  f"{self.max_prompt_chars}", param=param, code="context_length_exceeded")

    def check_max_tokens(self, mt: int) -> None:
        """Raises an API error when ``mt`` is not positive or above ``max_tokens``."""
        if mt <= 0:
            raise P.APIError(400, f"max_tokens must be positive, got {mt}", param="max_tokens")
        if mt > self.max_tokens:
            raise P.APIError(400, f"max_tokens {mt} is above this server's limit of {self.max_tokens}",
                             param="max_tokens")


_UNSET = object()
DEFAULT_MAX_TOKENS = 256  # a request's max_tokens when neither it nor its branch's generation config gives one
GENERATION_CONFIGS = ("auto", "vllm")  # --generation-config: the branches' sampling defaults, or none of them
COMPILE_TIMEOUT_S = 10.0  # a structured output's grammar compiles within this, or its request gets a 400
LONG_PROMPT_CHARS = 8192  # a prompt of more characters (about 2k tokens) is read on the long prompts' thread
PREFIX_CACHE_TOKENS = 8192  # finished requests' KV caches kept for later ones that begin the same way, in tokens


class OpenAIService(StreamReplies, TokenReplies, ScoringReplies):
    """Chat and text completions, model listing and health over a front (bundle, router, pipelines)."""

    def __init__(self, front: Front, *, limits: ServerLimits | None = None, max_batch: int = 16,
                 wait_ms: float = 10.0, route_batch: int = 64, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
                 tool_call_parser: str | None = None, generation_config: str = "auto",
                 override_generation_config: Mapping[str, Any] | None = None) -> None:
        if tool_call_parser not in (None, *PARSERS):
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {tool_call_parser!r}")
        if generation_config not in GENERATION_CONFIGS:
            raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIGS)}, got "
                             f"{generation_config!r}")
        unknown = sorted(set(override_generation_config or ()) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"override_generation_config: {', '.join(map(repr, unknown))} cannot be overridden; "
                             f"it takes {', '.join(SAMPLING_FIELDS)}")
        self.generation_config = generation_config
        self.overrides = sampling_defaults(override_generation_config or {}, "override_generation_config")
        self._defaults: dict[str, tuple[Any, dict[str, float | int]]] = {}  # see defaults()
        self.tool_call_parser = tool_call_parser  # tool_choice "auto": calls read out of free answers
        self.front, self.bundle = front, front.bundle
        self.limits = limits or ServerLimits()
        self.engine = Engine(self.bundle, max_batch=max_batch, wait_ms=wait_ms, max_queued=self.limits.max_queued,
                             prefix_cache_tokens=prefix_cache_tokens)
        self._aux = ThreadPoolExecutor(2, thread_name_prefix="branchmerge-route")  # routing and pipelines
        # structured outputs' grammars, compiled before their jobs reach the engine (its own threads: a slow
        # one holds neither routing nor the engine)
        self._grammars = ThreadPoolExecutor(2, thread_name_prefix="branchmerge-grammar")
        # prompts' tokenizing and chat templates (tens of ms for a long one) run off the event loop, on one
        # thread for short prompts and one for long ones: a flood of long prompts queues behind itself, neither
        # beside the engine's forward passes (more threads slow its steps: bench/serve_long_prompts.py) nor
        # ahead of the short prompts of other clients
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="branchmerge-prompts")
        self._long_encoder = ThreadPoolExecutor(1, thread_name_prefix="branchmerge-long-prompts")
        self._shared_tok: Any = _UNSET  # see _shared_tokenizer
        self._ttft: Any = None  # a histogram on /metrics
        self.loras: Any = None  # a server.lora.RuntimeLoras when adapters may be loaded at runtime
        self._routes = RouteBatcher(lambda texts: self.front.route_many(texts), self._aux, route_batch,
                                    cached=lambda text: self.front.route_cached(text))
        for b in self.bundle.branch_names:  # a generation config out of range fails here, by name
            if d := self.defaults(b):
                logger.info("branch %s: requests default to %s (%s)", b, d, "its generation config and overrides"
                            if generation_config == "auto" else "overrides")

    async def off_loop(self, fn: Any, *args: Any, chars: int = 0) -> Any:
        """``fn(*args)`` (tokenizing, a chat template) off the event loop: on the long prompts' thread when
        the prompt has over ``LONG_PROMPT_CHARS`` characters, else on the short ones'."""
        pool = self._long_encoder if chars > LONG_PROMPT_CHARS else self._encoder
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args))

    # ---- listing ------------------------------------------------------------------------------------
    async def health(self, full: bool) -> dict[str, Any]:
        """``/health``: only the status for a caller without the key."""
        if not full:
            return {"status": "ok"}
        return {"status": "ok", "branches": self.bundle.branch_names, "batches": self.engine.batches,
                "queued": self.engine.queued()}

    def model_ids(self) -> list[str]:
        return self.front.model_ids()

    def models(self, created: int) -> dict[str, Any]:
        """``/v1/models``; each entry has ``max_model_len`` as vLLM's do (a branch's context; for ``auto`` and
        pipelines, the smallest of all branches', which any of them fits) when the configs give one."""
        names = self.bundle.branch_names
        data = []
        for i in self.model_ids():
            ctx = self.bundle.context_limit(i) if i in names else self.bundle.tightest_context(names)
            lora = self.bundle.loras.get(i)  # an adapter loaded at runtime: its base, as vLLM lists it
            data.append({"id": i, "object": "model", "created": created, "owned_by": "branchmerge",
                         **({"max_model_len": ctx} if ctx else {}), **({"parent": lora.base} if lora else {})})
        return {"object": "list", "data": data}

    def register_metrics(self, registry: Registry) -> None:
        """The engine's metrics on ``/metrics``: jobs waiting and running, tokens by branch, batches."""
        self.engine.metrics = EngineMetrics(registry, self.engine)
        self._routes.sizes = registry.histogram("route_batch_size", "Texts per routing batch (model auto).",
                                                buckets=SIZE_BUCKETS)
        self._ttft = registry.histogram("time_to_first_token_seconds", "From a streamed request's arrival to "
                                        "its first generated token, by branch.", ("branch",))
        if self.loras is not None:
            self.loras.register_metrics(registry)

    # ---- shared steps -------------------------------------------------------------------------------
    def _max_tokens(self, req: P._Req, *, scoring: bool = False) -> int | None:
        """Validated ``max_tokens`` (None when the request leaves it to the branch's default). A scoring request
        (logprobs/echo) defaults to OpenAI's 16 and may ask for 0 new tokens with ``echo`` (score the prompt
        only)."""
        mt = req.max_new()
        if mt is None:
            if not scoring:
                return None  # (the branch's default, once its prompt is known: _default_max_tokens)
            mt = 16
        if scoring and (mt < 0 or (mt == 0 and not getattr(req, "echo", False))):
            raise P.APIError(400, f"max_tokens must be positive (0 only with echo), got {mt}", param="max_tokens")
        if not scoring or mt > 0:
            self.limits.check_max_tokens(mt)
        if req.n > 1 and scoring:
            raise P.APIError(400, f"n={req.n} is supported without logprobs and echo", param="n")
        return mt

    def _default_max_tokens(self, branch: str, n_prompt: int) -> int:
        """``max_tokens`` for a request without one: the branch's default (its generation config's
        ``max_new_tokens``, else 256) within ``--max-tokens-limit``, cut to what its context leaves after the
        prompt (as vLLM; a prompt that leaves nothing gets the context error)."""
        mt = min(int(self.defaults(branch).get("max_new_tokens", DEFAULT_MAX_TOKENS)), self.limits.max_tokens)
        limit = self.bundle.context_limit(branch)
        return max(1, min(mt, limit - n_prompt)) if limit else mt

    def defaults(self, branch: str) -> dict[str, float | int]:
        """What a request to ``branch`` that leaves out ``temperature``, ``top_p``, ``top_k``, ``min_p``,
        ``repetition_penalty`` or ``max_tokens`` gets: with ``--generation-config auto`` (the default, as vLLM)
        what the branch's generation config sets, with ``vllm`` nothing of it; then the operator's overrides.
        What neither sets is the server's own default (greedy, no penalty, 256 tokens)."""
        gc = self.bundle.generation_config(branch)
        known = self._defaults.get(branch)
        if known is None or known[0] is not gc:  # (an adapter unloaded and another loaded under its name)
            own = self.bundle.sampling_defaults(branch) if self.generation_config == "auto" else {}
            known = self._defaults[branch] = (gc, {**own, **self.overrides})
        return known[1]

    async def _resolve(self, model: str, text: str) -> tuple[str | None, str | None]:
        """(branch, pipeline) for a model name; routing runs on a worker thread, after the length checks."""
        if model == "auto" and self.front.router is not None:
            try:
                return await self._routes.route(text)
            except BranchmergeError as e:
                raise P.APIError(400, str(e)) from None
        try:
            if self.loras is not None:
                self.loras.touch(model)
            return self.front.resolve(model, text)
        except BranchNotFoundError as e:
            if model not in self.bundle.retiring and self.loras is not None and await self.loras.demand(model):
                return self.front.resolve(model, text)  # (an adapter of --lora-dir, loaded now)
            why = str(e) if model in self.bundle.retiring else f"the model {model!r} does not exist"
            raise P.APIError(404, f"{why}; available: {', '.join(self.front.model_ids())}",
                             param="model", code="model_not_found") from None
        except BranchmergeError as e:
            raise P.APIError(400, str(e), param="model", code="model_not_found") from None

    def _job(self, branch: str, ids: list[int], req: P._Req, mt: int, *, stream: bool, request: Any,
             param: str = "messages", choice: int = 0) -> Job:
        """A job for one choice of a prompt; choice ``k`` of a request with a ``seed`` samples under seed + k."""
        try:
            self.bundle.check_context(branch, len(ids), mt)
        except ContextLengthError as e:
            raise P.APIError(400, f"this model's maximum context length is exceeded: {e}", param=param,
                             code="context_length_exceeded") from None
        if req.min_tokens > mt:
            raise P.APIError(400, f"min_tokens={req.min_tokens} is more than max_tokens={mt}", param="min_tokens")
        d = self.defaults(branch)

        def given(name: str, server: Any) -> Any:  # the request's, else the branch's default, else the server's
            v = getattr(req, name)
            return v if v is not None else d.get(name, server)

        # (repetition_penalty: None leaves the branch's generation config's, which "vllm" replaces by none)
        sampling = RowSettings(
            temperature=given("temperature", 0.0), top_p=given("top_p", 1.0), top_k=given("top_k", 0),
            min_p=given("min_p", 0.0),
            seed=None if req.seed is None else req.seed + choice, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0, logit_bias=req.bias() or None,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            repetition_penalty=given("repetition_penalty", None if self.generation_config == "auto" else 1.0),
            allowed_token_ids=tuple(req.allowed_token_ids or ()),
            structure=P.checked_structure(req), logprobs=self._recorded_logprobs(req),
            bad_words=bad_word_ids(self.bundle.tokenizer(branch), req.bad_words) if req.bad_words else ())
        for name, ids_ in sampling.token_ids():  # here, a 400 for this request; in its batch, a failed batch
            try:
                self.bundle.check_ids([ids_], [branch], rows=[name])
            except BranchmergeError as e:
                raise P.APIError(400, str(e), param=name) from None
        # a parser whose calls begin with a special token ([TOOL_CALLS]) reads answers with special tokens kept
        special = (self.tool_call_parser is not None and PARSERS[self.tool_call_parser].special
                   and isinstance(req, P.ChatRequest) and req.calls() == "auto")
        return Job(ids, branch, mt, sampling=sampling, stop=req.stops(), keep_stop=req.include_stop_str_in_output,
                   skip_special=req.skip_special_tokens and not special, stream=stream, request=request,
                   salt=req.cache_salt or "")

    @staticmethod
    def _recorded_logprobs(req: P._Req) -> int | None:
        """How many likeliest tokens each generated token's log-probability comes with (None: none recorded):
        chat's ``logprobs``/``top_logprobs``; a streamed completion's ``logprobs`` (one not streamed is scored
        in one pass over prompt and answer instead, as ``echo`` needs)."""
        if isinstance(req, P.ChatRequest):
            return (req.top_logprobs or 0) if req.logprobs else None
        return req.logprobs if req.stream else None

    def _submit(self, jobs: list[Job]) -> list[Job]:
        loop = asyncio.get_running_loop()
        try:
            out = self.engine.submit_many([j.bind(loop) for j in jobs])
        except Busy as e:
            raise P.APIError(503, str(e), type_="server_error", code="server_busy") from None
        for j in jobs:
            if isinstance(j.request, _Request):
                j.request.jobs.append(j)
        return out

    async def _guarded(self, request: _Request, work: Awaitable[Reply]) -> Reply:
        """Run a request's work; if it fails or is cancelled, withdraw every job it queued (all or nothing)."""
        try:
            return await work
        except BaseException:
            self.engine.withdraw(request.jobs)
            raise

    async def _wait(self, jobs: list[Job], disconnected: Disconnected | None) -> list[Job]:
        """Wait for ``jobs``; if the client goes away meanwhile, cancel them (and raise ClientGone)."""
        waiting = asyncio.ensure_future(asyncio.gather(*(j.wait() for j in jobs)))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.25)
                if done:
                    break
                if disconnected is not None and await disconnected():
                    raise ClientGone()
        except BaseException:  # ClientGone, or the request task cancelled
            self.engine.withdraw(jobs)
            waiting.cancel()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        for j in jobs:
            if j.error is not None:
                ref = uuid.uuid4().hex[:8]
                logger.error("request error %s: %r", ref, j.error)
                raise P.APIError(500, f"{'scoring' if j.score else 'generation'} failed (error id {ref}; see the "
                                      "server log)", type_="server_error")
        return jobs

    def _finish(self, branch: str, job: Job) -> tuple[str, str]:
        decode = partial(self.bundle.tokenizer(branch).decode, skip_special_tokens=job.skip_special)
        text = decode(job.new_ids)
        start = min_tokens_start(decode, job.new_ids, job.sampling.min_tokens)
        text, hit = cut_at_stop(text, job.stop, keep=job.keep_stop, start=start)
        if hit:
            return text, "stop"
        return text, "length" if len(job.new_ids) >= job.max_tokens else "stop"

    # ---- one prompt ---------------------------------------------------------------------------------
    async def _one(self, req: P._Req, kind: str, text: str, encode: Callable[[str], list[int]], *, rid: str,
                   index: int, disconnected: Disconnected | None, request: Any, chars: int = 0
                   ) -> dict | tuple[str, list]:
        """One prompt (``chars`` long, about): its response body, or with ``req.stream`` its branch and one
        event stream per choice."""
        asked = self._max_tokens(req)
        branch, pipeline = await self._resolve(req.model, text)
        st = P.checked_structure(req)
        if pipeline is not None:
            if req.n > 1:
                raise P.APIError(400, f"n={req.n} is not supported for pipeline {pipeline!r}", param="n")
            for name in ("logprobs", "prompt_logprobs"):
                if getattr(req, name, None) not in (None, False):
                    raise P.APIError(400, f"{name} need a branch, not pipeline {pipeline!r}", param=name)
            final, stages, pt, ct, reason, live = await self._pipeline(pipeline, text, request, disconnected, st,
                                                                       live=req.stream)
            if live is not None:  # the last stage's tokens stream as they come
                request.prompt_tokens += pt
                request.completion_tokens += ct
                return live.branch, [self._stream(kind, rid, req.model, live.branch, live, index, lstrip=True,
                                                  usage=P.continuous_usage(req))]
            answered = stages[-1]["branch"]
            if req.stream:
                request.prompt_tokens += pt
                request.completion_tokens += ct
                return answered, [self._once(kind, rid, req.model, final, answered, index, reason,
                                             (pt, ct) if P.continuous_usage(req) else None)]
            out = P.body(kind, rid, req.model, [(final, reason)], pt, ct, answered)
            out["stages"] = stages
            return out
        # (off the event loop: a long prompt's tokenizing and a chat template's rendering take tens of ms, and
        # a template is a bundle's code: the loop goes on streaming other requests' tokens meanwhile)
        ids = self._truncate(req, await self.off_loop(encode, branch, chars=chars))
        mt = asked if asked is not None else self._default_max_tokens(branch, len(ids))
        if req.use_beam_search:
            return await self._beam(req, kind, branch, ids, mt, rid=rid, disconnected=disconnected, request=request)
        await self._compile(st, [branch])
        jobs = self._submit([self._job(branch, ids, req, mt, stream=req.stream, request=request, choice=k)
                             for k in range(req.n)])
        k = req.prompt_logprobs
        prompt_job = None if k is None else self._submit([Job(ids, branch, 0, request=request, score=(k, False))])
        if req.stream:
            request.prompt_tokens += len(ids)
            return branch, [self._stream(kind, rid, req.model, branch, j, index + k, usage=P.continuous_usage(req))
                            for k, j in enumerate(jobs)]
        await self._wait(jobs + (prompt_job or []), disconnected)
        out = P.body(kind, rid, req.model, [self._finish(branch, j) for j in jobs], len(ids),
                     sum(len(j.new_ids) for j in jobs), branch)
        if kind == "chat" and getattr(req, "logprobs", None):
            for choice, j in zip(out["choices"], jobs):
                choice["logprobs"] = self._logprobs_of(kind, branch, j.new_ids, j.record or [])
        if prompt_job:
            out["prompt_logprobs"] = self._prompt_logprobs(branch, ids, prompt_job[0].scored, k)
        return out

    # what beam search leaves as it is: any other value of these is a 400 (beams are ranked by the model's
    # own log-probabilities, and every beam ends at end of text or max_tokens)
    _BEAM_NEUTRAL = {"temperature": (None, 0, 0.0), "top_p": (None, 1, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0),
                     "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
                     "repetition_penalty": (None, 1), "stop": (None, [], ""), "stop_token_ids": (None, []),
                     "ignore_eos": (False,), "min_tokens": (0,), "allowed_token_ids": (None,), "bad_words": (None, []),
                     "logprobs": (None, False), "prompt_logprobs": (None,), "stream": (False,)}

    async def _beam(self, req: P._Req, kind: str, branch: str, ids: list[int], mt: int, *, rid: str,
                    disconnected: Disconnected | None, request: Any) -> dict:
        """vLLM's ``use_beam_search``: one job that runs ``n`` beams alone; its ``n`` best answers, best first."""
        for name, neutral in self._BEAM_NEUTRAL.items():
            if getattr(req, name, None) not in neutral:
                raise P.APIError(400, f"`{name}` is not supported with use_beam_search (beams are ranked by the "
                                      "model's own log-probabilities); leave it out", param=name)
        if (st := P.checked_structure(req)) is not None:
            raise P.APIError(400, f"{st.field}: structured outputs are not supported with use_beam_search",
                             param=st.field)
        job = self._job(branch, ids, req, mt, stream=False, request=request)  # (the context checked)
        job.beams = (req.n, req.length_penalty)
        await self._wait(self._submit([job]), disconnected)
        beams = job.beamed or []
        return P.body(kind, rid, req.model, [(g.text, g.finish_reason) for g in beams], len(ids),
                      sum(len(g.new_ids) for g in beams), branch)

    async def _compile(self, st: Structure | None, branches: list[str]) -> None:
        """Compile ``st`` for each branch's vocabulary here, off the engine's thread (then cached), within
        :data:`COMPILE_TIMEOUT_S` (a 400 ``structure_timeout`` past it)."""
        if st is None:
            return
        loop = asyncio.get_running_loop()
        for b in dict.fromkeys(branches):
            try:
                await asyncio.wait_for(loop.run_in_executor(self._grammars, self.bundle.structurer(b).compile, st),
                                       COMPILE_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise P.APIError(400, f"{st.field} did not compile within {COMPILE_TIMEOUT_S:g} s; simplify it",
                                 param=st.field, code="structure_timeout") from None

    def _logprobs_of(self, kind: str, branch: str, ids: list[int], record: list, offset: int = 0) -> dict:
        """The ``logprobs`` of new tokens ``ids`` from ``record``, what their job's sampler recorded as they were
        drawn (the model's own log-probabilities, before any sampling setting; vLLM's default)."""
        tok = self.bundle.tokenizer(branch)
        piece = lambda t: tok.decode([t])  # noqa: E731
        got = record[:len(ids)]
        return P.token_logprobs(kind, [piece(t) for t in ids[:len(got)]], [e.logprob for e in got],
                                [[(piece(i), v) for i, v in e.top] for e in got], offset)

    async def _pipeline(self, name: str, question: str, request: Any, disconnected: Disconnected | None,
                        structure: Structure | None = None, live: bool = False
                        ) -> tuple[str, list[dict], int, int, str, Job | None]:
        """Run a pipeline stage by stage through the engine. Each stage's routing and encoding run on a worker
        thread, its generation as jobs this request waits for like any other: no thread is held while the
        engine works, and a client that goes away withdraws the stage's jobs (nothing later runs).
        ``structure``: the request's, for the final answer (the last stage). Returns the final answer, each
        stage's branch and text, the prompt and completion tokens, the last stage's finish reason, and None;
        with ``live`` (a streamed request) and a last stage without ``extract`` (which must see its whole
        output), it returns once the last stage is queued, as a streaming job (the rest empty but the tokens
        of the stages before)."""
        from branchmerge.staged import ExtractTimeoutError, pipeline_steps

        loop = asyncio.get_running_loop()
        pipe = self.front.pipelines.get(name)
        steps = pipeline_steps(self.bundle, pipe, [question], structure)
        pt = ct = 0

        def advance(sent: list | None) -> tuple[bool, Any]:  # StopIteration cannot cross a future
            try:
                return False, next(steps) if sent is None else steps.send(sent)
            except StopIteration as done:
                return True, done.value

        sent: list | None = None
        while True:
            try:
                finished, value = await loop.run_in_executor(self._aux, advance, sent)
            except ExtractTimeoutError as e:  # the operator's pipelines file, not the request
                raise P.APIError(500, str(e), type_="server_error", code="extract_timeout") from None
            except BranchmergeError as e:
                raise P.APIError(400, str(e)) from None
            if finished:
                break
            batch = value
            await self._compile(batch.structure, batch.branches)
            settings = RowSettings(batch.temperature, structure=batch.structure)
            pt = pt or len(batch.ids[0])
            stream = (live and batch.stage == len(pipe.stages)
                      and (structure is not None or not pipe.stages[-1].extract))
            jobs = self._submit([Job(list(ids), b, batch.max_new_tokens, sampling=settings,
                                     stop=list(batch.stop), request=request, stream=stream)
                                 for ids, b in zip(batch.ids, batch.branches)])
            if stream:
                steps.close()
                return "", [], pt, ct, "", jobs[0]
            await self._wait(jobs, disconnected)
            ct += sum(len(j.new_ids) for j in jobs)
            sent = [GenerationResult(j.branch, j.ids, j.new_ids,
                                     self.bundle.tokenizer(j.branch).decode(j.new_ids, skip_special_tokens=True),
                                     "length" if j.stop_id is None and len(j.new_ids) >= batch.max_new_tokens
                                     else "stop", j.stop_id) for j in jobs]
        stages = value[0]
        info = [{"stage": s.stage, "branch": s.branch, "text": s.text} for s in stages]
        return (stages[-1].text, info, stages[0].prompt_tokens, sum(s.completion_tokens for s in stages),
                stages[-1].finish_reason, None)

    # ---- endpoints ----------------------------------------------------------------------------------
    async def chat(self, req: P.ChatRequest, disconnected: Disconnected | None = None) -> Reply:
        req._tool_parser = self.tool_call_parser
        if (refused := P.unsupported(req)) is not None:
            raise refused
        P.checked_structure(req)  # a bad schema, pattern or grammar: a 400 before any routing
        if req.top_logprobs and not req.logprobs:
            raise P.APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if req.prompt_logprobs is not None and req.stream:
            raise P.APIError(400, "prompt_logprobs is not supported with stream=true", param="stream")
        if not req.messages:
            raise P.APIError(400, "messages must be a non-empty list", param="messages")
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        self.limits.check_chars("".join(m.text() for m in req.messages) + (json.dumps(tools) if tools else ""),
                                "messages")
        last_user = next((m.text() for m in reversed(req.messages) if m.role == "user"), req.messages[-1].text())
        if not last_user.strip():
            raise P.APIError(400, "the last user message is empty", param="messages")
        try:
            msgs = [m.as_dict() for m in req.messages]
        except ValueError as e:
            raise P.APIError(400, str(e), param="messages") from None
        calls = req.calls()  # None, "required" or the function to call
        template = req.template_options()
        request = _Request()

        rid = P.new_id("chat")

        async def work() -> Reply:
            encode = partial(self.bundle.encode_messages, msgs, tools=tools, **template)
            out = await self._one(req, "chat", last_user, encode, rid=rid, index=0, disconnected=disconnected,
                                  request=request, chars=len(str(msgs)) + len(str(tools or "")))
            if calls is not None:  # the answers as tool calls
                parser = self.tool_call_parser or "hermes"
                out = (out[0], [stream_calls(s, calls, parser) for s in out[1]]) if isinstance(out, tuple) else \
                    answer_calls(out, calls, parser)
            return self._reply(out, self._usage(req, "chat", rid, request))

        return await self._guarded(request, work())

    def _prompts(self, req: P.CompletionRequest) -> list[str | list[int]]:
        """A request's prompts: one text, one list of token ids, or a list of either (OpenAI's batch form)."""
        prompt = req.prompt
        many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
        prompts = list(prompt) if many else [prompt]
        if len(prompts) > self.limits.max_prompts:
            raise P.APIError(400, f"{len(prompts)} prompts in one request; this server takes at most "
                                  f"{self.limits.max_prompts}", param="prompt")
        if len(prompts) * req.n > self.limits.max_choices:
            raise P.APIError(400, f"{len(prompts)} prompts × n={req.n} is {len(prompts) * req.n} completions; this "
                                  f"server takes at most {self.limits.max_choices} per request", param="n")
        for i, p in enumerate(prompts):
            where = f"prompt[{i}]" if many else "prompt"
            if (isinstance(p, list) and not p) or (isinstance(p, str) and not p.strip()):
                raise P.APIError(400, f"{where} must not be empty", param="prompt")
            self.limits.check_chars(p if isinstance(p, str) else " " * len(p), where)
            if isinstance(p, list) and req.model == "auto" and self._shared_tokenizer() is None:
                raise P.APIError(400, f"{where} is token ids, but this bundle's branches have different tokenizers, "
                                      "so 'auto' cannot read them: name a branch as the model, or send text "
                                      "(lm_eval: tokenized_requests=False)", param="model")
        return prompts

    def _shared_tokenizer(self):
        """The tokenizer every branch shares (same vocabulary), which reads token-id prompts for routing; or
        None when branches differ."""
        if self._shared_tok is _UNSET:
            names = self.bundle.branch_names
            first = self.bundle.tokenizer(names[0])
            vocab = first.get_vocab()
            same = all(self.bundle.tokenizer(b).get_vocab() == vocab for b in names[1:])
            self._shared_tok = first if same else None
        return self._shared_tok

    def _route_text(self, prompt: str | list[int]) -> str:
        """What the router reads: the text, or token ids decoded with the shared tokenizer."""
        if isinstance(prompt, str):
            return prompt
        tok = self._shared_tokenizer()
        return tok.decode(prompt, skip_special_tokens=True) if tok is not None else ""

    @staticmethod
    def _truncate(req: P._Req, ids: list[int]) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: only the prompt's last k tokens."""
        return ids[-req.truncate_prompt_tokens:] if req.truncate_prompt_tokens else ids

    def _token_ids(self, branch: str, ids: list[int]) -> list[int]:
        """A token-id prompt, checked here so that it is refused alone rather than failing its batch."""
        try:
            self.bundle.check_ids([ids], [branch], rows=["prompt"])
        except BranchmergeError as e:
            raise P.APIError(400, str(e), param="prompt") from None
        return list(ids)

    async def _completion(self, req: P.CompletionRequest, prompt: str | list[int], *, rid: str, index: int,
                          disconnected: Disconnected | None, request: Any, route_text: str | None = None
                          ) -> dict | tuple:
        if req.echo or req.prompt_logprobs is not None or (req.logprobs is not None and not req.stream):
            return await self._scored(req, prompt, disconnected, request, route_text)
        if isinstance(prompt, list):
            encode = lambda b: self._token_ids(b, prompt)  # noqa: E731
            text = self._route_text(prompt) if req.model == "auto" else ""
        else:
            encode = lambda b: list(self.bundle.tokenizer(b)(prompt)["input_ids"])  # noqa: E731
            text = prompt
        return await self._one(req, "completion", text, encode, rid=rid, index=index, disconnected=disconnected,
                               request=request, chars=0 if isinstance(prompt, list) else len(prompt))

    async def completions(self, req: P.CompletionRequest, disconnected: Disconnected | None = None) -> Reply:
        if (refused := P.unsupported(req)) is not None:
            raise refused
        P.checked_structure(req)  # a bad schema, pattern or grammar: a 400 before any routing
        prompts = self._prompts(req)
        request = _Request()
        return await self._guarded(request, self._completions(req, prompts, request, disconnected))

    async def _completions(self, req: P.CompletionRequest, prompts: list, request: _Request,
                           disconnected: Disconnected | None) -> Reply:
        rid = P.new_id("completion")
        if req.stream:  # every prompt's n choices in one event stream, indexed prompt by prompt
            if req.echo or req.prompt_logprobs is not None:
                what = "echo" if req.echo else "prompt_logprobs"
                raise P.APIError(400, f"{what} is not supported with stream=true", param="stream")
            return self._sse([await self._completion(req, p, rid=rid, index=i * req.n, disconnected=disconnected,
                                                     request=request) for i, p in enumerate(prompts)],
                             self._usage(req, "completion", rid, request))
        # every prompt is its own job; the engine batches them (and scoring shares their common prefixes)
        routes = self._scoring_route_texts(req, prompts)
        bodies = await asyncio.gather(*(self._completion(req, p, rid=rid, index=0, disconnected=disconnected,
                                                         request=request, route_text=r)
                                        for p, r in zip(prompts, routes)))
        if len(bodies) == 1:
            return self._reply(bodies[0])
        merged = P.merge_bodies(list(bodies))
        return Reply(body=merged, headers=P.branch_header(merged["branch"]))
