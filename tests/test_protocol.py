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
    assert P.ChatRequest.model_validate({"model": "a", "messages": [], "stop": "x" * 512}).stops() == ["x" * 512]
    for bad in ({"model": "a", "messages": [{"role": "user", "content": "\ud800"}]},
                {"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
                {"model": "a", "messages": [{"role": "robot", "content": "x"}]},
                {"model": "a", "messages": [], "n": 17},
                {"model": "a", "messages": [], "temperature": 2.5},
                {"model": "a", "messages": [], "stop": ["1", "2", "3", "4", "5"]},
                {"model": "a", "messages": [], "stop": "x" * 513},  # decoded back over every step
                {"model": "a", "messages": [], "stop": ["ok", "\ud800"]},
                {"model": "x" * 300, "messages": []}):
        with pytest.raises(ValidationError):
            P.ChatRequest.model_validate(bad)


@pytest.mark.parametrize("kind,field,value", [
    ("completion", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "structural_tag", {"type": "structural_tag"}),
    ("completion", "best_of", 3),
    ("completion", "suffix", "end"),
    ("chat", "guided_whitespace_pattern", " "),
])
def test_fields_this_server_does_not_do_are_refused_not_ignored(kind, field, value):
    """Answering as if a penalty, a JSON mode or a tool list were not there would be silently wrong."""
    base = {"model": "a", "messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else \
        {"model": "a", "prompt": "hi"}
    cls = P.ChatRequest if kind == "chat" else P.CompletionRequest
    err = P.unsupported(cls.model_validate({**base, field: value}))
    assert err is not None and err.status == 400 and err.param == field
    assert f"`{field}` is not supported" in err.message
    # their neutral values, which clients send by default, and `seed` (lm-evaluation-harness sends one) pass
    for neutral in ({"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [],
                     "tool_choice": "none", "response_format": {"type": "text"}, "seed": 1234, "best_of": 1,
                     "repetition_penalty": 1.0, "skip_special_tokens": True,
                     "top_k": 5, "min_p": 0.1},):
        assert P.unsupported(cls.model_validate({**base, **neutral})) is None
    assert P.unsupported(P.CompletionRequest.model_validate({"model": "a", "prompt": "x", "logprobs": 2})) is None


def test_non_text_content_parts_are_named():
    with pytest.raises(ValidationError, match="a content part of type 'image_url' is not supported"):
        P.ChatRequest.model_validate({"model": "a", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})


@pytest.mark.parametrize(("bias", "msg"), [({"x": 1}, "keys are token ids"), ({"5": 101}, r"in \[-100, 100\]"),
                                           ({str(i): 1 for i in range(P.MAX_LOGIT_BIAS + 1)}, "at most"),
                                           ({"9" * 40: 1}, "keys are token ids")])
def test_logit_bias_is_checked(bias, msg):
    with pytest.raises(ValidationError, match=msg):
        P.CompletionRequest.model_validate({"model": "a", "prompt": "x", "logit_bias": bias})
    ok = P.CompletionRequest.model_validate({"model": "a", "prompt": "x", "logit_bias": {"5": -100, "7": 2.5}})
    assert ok.bias() == {5: -100.0, 7: 2.5}
