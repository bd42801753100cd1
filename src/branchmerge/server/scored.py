"""Scored completions (``logprobs``/``echo``/``prompt_logprobs`` on ``/v1/completions``), how
lm-evaluation-harness scores loglikelihoods: generate as usual, then one forward pass over prompt and answer
gives every token's log-probability (scoring jobs that share a context share its forward)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from itertools import accumulate
from typing import Any

from branchmerge.runtime.scoring import common_prefix
from branchmerge.server import protocol as P
from branchmerge.server.engine import Job

Disconnected = Callable[[], Awaitable[bool]]  # (as api's: whether the client went away)


class ScoringReplies:
    """The scoring part of :class:`~branchmerge.server.api.OpenAIService` (which gives ``bundle``, the
    engine's ``_submit``/``_wait`` and the request helpers)."""

    bundle: Any

    def _scoring_route_texts(self, req: P.CompletionRequest, prompts: list) -> list[str | None]:
        """What ``auto`` routes for each prompt of a scoring request: a prompt sharing at least half of itself
        with another prompt of the request (a question with each answer, as lm_eval batches them) is routed
        on that shared context, so all answers of one question are scored on one branch, as the in-process
        backend does; any other prompt on its whole text (None)."""
        if req.model != "auto" or (req.logprobs is None and not req.echo) or len(prompts) < 2:
            return [None] * len(prompts)
        # sorted, a prompt's longest shared prefix is with a neighbour (strings and id lists kept apart)
        order = sorted(range(len(prompts)), key=lambda i: (isinstance(prompts[i], str), prompts[i]))
        best = [0] * len(prompts)
        for a, b in zip(order, order[1:]):
            n = common_prefix(prompts[a], prompts[b])
            best[a], best[b] = max(best[a], n), max(best[b], n)
        return [self._route_text(p[:n]) if n and 2 * n >= len(p) else None for p, n in zip(prompts, best)]

    async def _scored(self, req: P.CompletionRequest, prompt: str | list[int], disconnected: Disconnected | None,
                      request: Any, route_text: str | None = None) -> dict:
        """A completion with ``logprobs`` and/or ``echo`` (how lm-evaluation-harness scores loglikelihoods):
        generate as usual, then one forward over prompt + completion gives every token's log-probability."""
        if req.stream:
            raise P.APIError(400, "echo is not supported with stream=true", param="stream")
        if req.use_beam_search:
            raise P.APIError(400, "logprobs and echo are not supported with use_beam_search", param="use_beam_search")
        mt = self._max_tokens(req, scoring=True)
        text = (route_text if route_text is not None else self._route_text(prompt)) if req.model == "auto" else ""
        branch, pipeline = await self._resolve(req.model, text)
        if pipeline is not None or branch is None:
            raise P.APIError(400, "logprobs and echo need a branch, not a pipeline", param="model")
        tok = self.bundle.tokenizer(branch)
        ids = self._token_ids(branch, prompt) if isinstance(prompt, list) else \
            list((await self.off_loop(tok, prompt, chars=len(prompt)))["input_ids"])  # (off the event loop, as _one)
        ids = self._truncate(req, ids)
        job = self._job(branch, ids, req, mt, stream=False, request=request, param="prompt")  # context checked first
        text, reason, new_ids = "", "length", []
        # one greedy token (lm-evaluation-harness's loglikelihood requests): a single forward pass scores the
        # prompt and picks the token; otherwise generate as usual, then score prompt + completion
        settings = job.sampling
        one_greedy = (mt == 1 and not settings.temperature > 0 and not settings.adjusts
                      and not settings.stops_own_way)
        if mt > 0 and not one_greedy:
            await self._wait(self._submit([job]), disconnected)
            (text, reason), new_ids = self._finish(branch, job), job.new_ids
            if job.stop_id is not None:  # the end-of-sequence token is scored too, as vLLM does
                new_ids = [*new_ids, job.stop_id]
        top = max(req.logprobs or 0, req.prompt_logprobs or 0)
        scoring = Job(ids + new_ids, branch, 0, request=request, score=(top, one_greedy))
        sc = (await self._wait(self._submit([scoring]), disconnected))[0].scored
        if one_greedy:
            nxt = sc.token_ids[-1]
            stopped = nxt in self.bundle.stop_ids(branch)  # scored, but not part of the text
            job.new_ids = [] if stopped else [nxt]
            text, reason = self._finish(branch, job)
            reason, new_ids = "stop" if stopped else reason, [nxt]
        start = 0 if req.echo else len(ids)
        pieces = [tok.decode([t]) for t in sc.token_ids[start:]]
        offsets = list(accumulate(map(len, pieces), initial=0))[:-1]
        logprobs = None if req.logprobs is None else {
            "tokens": pieces, "token_logprobs": sc.logprobs[start:], "text_offset": offsets,
            "top_logprobs": [None if t is None else {tok.decode([i]): v for i, v in t[:req.logprobs]}
                             for t in sc.top[start:]]}
        out = ((prompt if isinstance(prompt, str) else tok.decode(ids)) + text) if req.echo else text
        b = P.body("completion", P.new_id("completion"), req.model, [(out, reason)], len(ids), len(new_ids), branch)
        b["choices"][0]["logprobs"] = logprobs
        if req.prompt_logprobs is not None:
            b["choices"][0]["prompt_logprobs"] = self._prompt_logprobs(branch, ids, sc, req.prompt_logprobs)
        return b

    def _prompt_logprobs(self, branch: str, ids: list[int], sc: Any, top: int) -> list:
        """vLLM's ``prompt_logprobs`` of prompt ``ids`` from their scores ``sc`` (a TokenLogprobs that begins
        with them)."""
        tok = self.bundle.tokenizer(branch)
        n = len(ids)
        return P.prompt_logprobs(lambda t: tok.decode([t]), ids, sc.logprobs[:n], (sc.ranks or [None] * n)[:n],
                                 [None if t is None else t[:top] for t in sc.top[:n]])
