"""The OpenAI wire format on its own: request validation and response builders, no server, no model."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from branchmerge.server import protocol as P


def test_bodies_and_merging():
    b = P.body("chat", "chatcmpl-1", "a", [("hi", "stop"), ("yo", "length")], 5, 3, "a")
    assert b["object"] == "chat.completion" and b["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                                "total_tokens": 8}
    assert [c["message"]["content"] for c in b["choices"]] == ["hi", "yo"] and [c["index"] for c in b["choices"]] == [0, 1]
    t1 = P.body("completion", "cmpl-1", "auto", [("x", "stop")], 2, 1, "a")
    t2 = P.body("completion", "cmpl-2", "auto", [("y", "length")], 4, 2, "b")
    m = P.merge_bodies([t1, t2])
    assert [(c["index"], c["text"], c["branch"]) for c in m["choices"]] == [(0, "x", "a"), (1, "y", "b")]
    assert m["usage"]["total_tokens"] == 9 and m["branch"] == ["a", "b"]
    assert P.branch_header(["a", "b", "a"]) == {"X-Branchmerge-Branch": "a,b"}


def test_stream_chunks():
    first = json.loads(P.chunk("chat", "r", "m", None, None, "a", first=True, index=2).removeprefix("data: "))
    assert first["choices"][0] == {"index": 2, "delta": {"role": "assistant"}, "finish_reason": None, "logprobs": None}
    text = json.loads(P.chunk("completion", "r", "m", "ab", "stop", "b").removeprefix("data: "))
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "ab" and text["branch"] == "b"
    assert P.DONE == "data: [DONE]\n\n"
    assert P.APIError(404, "gone", code="model_not_found").body()["error"] == {
        "message": "gone", "type": "invalid_request_error", "param": None, "code": "model_not_found"}


def test_request_validation():
    r = P.ChatRequest.model_validate({"model": "a", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "stop": "x"})
    assert r.messages[0].text() == "ab" and r.stops() == ["x"] and r.max_new() is None
    assert P.CompletionRequest.model_validate({"model": "a", "prompt": [[1, 2], [3]], "max_completion_tokens": 5,
                                              "max_tokens": 9}).max_new() == 5
    for bad in ({"model": "a", "messages": [{"role": "user", "content": "\ud800"}]},
                {"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
                {"model": "a", "messages": [{"role": "robot", "content": "x"}]},
                {"model": "a", "messages": [], "n": 17},
                {"model": "a", "messages": [], "temperature": 2.5},
                {"model": "a", "messages": [], "stop": ["1", "2", "3", "4", "5"]},
                {"model": "x" * 300, "messages": []}):
        with pytest.raises(ValidationError):
            P.ChatRequest.model_validate(bad)
