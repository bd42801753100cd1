"""Anthropic's Messages API (``/v1/messages``) through the real ``anthropic`` SDK against a served bundle:
answers equal the chat completion of the same conversation, stop sequences end the answer and are named,
streamed events add up to the answer, tokens are counted as the template renders them, the key is read as
Anthropic's clients send it, and what the server does not do is refused in Anthropic's error shape."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

import branchmerge
from branchmerge.server import create_app
from tests.serving import serving

ASK = [{"role": "user", "content": "rev abcdef="}]
T0 = {"temperature": 0}  # (vLLM's extension: the SDK no longer has sampling fields)


@pytest.fixture(scope="module")
def served(bundles):
    b = branchmerge.load(bundles[0.9], dtype="float32")
    with serving(create_app(b, max_batch=4, wait_ms=5, api_key="k")) as url:
        yield {"url": url, "anthropic": anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=60),
               "openai": openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)}


def _chat(served, messages, **kw):
    r = served["openai"].chat.completions.create(model="a", messages=messages, temperature=0, **kw)
    return r.choices[0].message.content, r.usage, r.choices[0].finish_reason


def test_a_message_is_the_chat_answer_of_the_same_conversation(served):
    c = served["anthropic"]
    m = c.messages.create(model="a", max_tokens=6, messages=ASK, extra_body=T0)
    text, usage, reason = _chat(served, ASK, max_tokens=6)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == text
    assert (m.usage.input_tokens, m.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[reason] and m.stop_sequence is None
    assert m.model_extra["branch"] == "a"
    turns = [{"role": "user", "content": [{"type": "text", "text": "dup ab="}]},
             {"role": "assistant", "content": "abab"}, {"role": "user", "content": "rev xy="}]
    m = c.messages.create(model="a", max_tokens=4, messages=turns, extra_body=T0,
                          system=[{"type": "text", "text": "be brief"}])
    text, *_ = _chat(served, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "dup ab="},
                              *turns[1:]], max_tokens=4)
    assert m.content[0].text == text


def test_a_stop_sequence_ends_the_answer_and_is_named(served):
    c = served["anthropic"]
    full, *_ = _chat(served, ASK, max_tokens=12)
    seq = full[3:5]
    want = full[:full.index(seq)]
    m = c.messages.create(model="a", max_tokens=12, messages=ASK, extra_body=T0, stop_sequences=[seq, "zzzz"])
    assert m.content[0].text == want and m.stop_reason == "stop_sequence" and m.stop_sequence == seq
    with c.messages.stream(model="a", max_tokens=12, messages=ASK, extra_body=T0, stop_sequences=[seq]) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == want and final.stop_reason == "stop_sequence" and final.stop_sequence == seq
    assert final.content[0].text == want


def test_streamed_events_add_up_to_the_message(served):
    c = served["anthropic"]
    plain = c.messages.create(model="b", max_tokens=8, messages=ASK, extra_body=T0)
    events = list(c.messages.create(model="b", max_tokens=8, messages=ASK, extra_body=T0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == plain.content[0].text
    delta = events[-2]
    assert delta.delta.stop_reason == plain.stop_reason and delta.usage.output_tokens == plain.usage.output_tokens


def test_output_config_structures_the_answer(served):
    import json

    schema = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 3}}, "required": ["w"],
              "additionalProperties": False}
    m = served["anthropic"].messages.create(model="b", max_tokens=30, messages=ASK, extra_body=T0,
                                            output_config={"format": {"type": "json_schema", "schema": schema}})
    assert set(json.loads(m.content[0].text)) == {"w"}


def test_count_tokens_is_the_templates_count(served):
    c = served["anthropic"]
    got = c.messages.count_tokens(model="a", messages=ASK, system="be brief")
    want = httpx.post(served["url"] + "/tokenize", headers={"Authorization": "Bearer k"}, json={
        "model": "a", "messages": [{"role": "system", "content": "be brief"}, *ASK]}).json()["count"]
    assert got.input_tokens == want > 0
    m = c.messages.create(model="a", max_tokens=2, messages=ASK, system="be brief")
    assert m.usage.input_tokens == want


def test_the_key_as_anthropic_clients_send_it(served):
    body = {"model": "a", "max_tokens": 2, "messages": ASK}
    assert httpx.post(served["url"] + "/v1/messages", headers={"x-api-key": "k"}, json=body).status_code == 200
    r = httpx.post(served["url"] + "/v1/messages", headers={"x-api-key": "wrong"}, json=body)
    assert r.status_code == 401
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=served["url"], api_key="wrong", max_retries=0).messages.create(**body)


@pytest.mark.parametrize("kw, status, says", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}]},
     400, "messages[0].content[0] of type 'image' is not supported"),
    ({"messages": [{"role": "system", "content": "x"}]}, 400, "messages[0].role must be user or assistant"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "`thinking` is not supported"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "this server calls client tools"),
    ({"tool_choice": {"type": "any"}}, 400, "tool_choice needs tools"),
    ({"max_tokens": 10 ** 6}, 400, "max_tokens 1000000 is above"),
    ({"temperature": 1.5}, 400, "temperature: Input should be less than or equal to 1"),
    ({"output_config": {"effort": "high"}}, 400, "output_config takes a format here"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, 400, "stop_sequences: List should have at most 4 items"),
    ({"model": "nope"}, 404, "'nope' does not exist"),
    ({"messages": ["hi"]}, 400, "messages.0: Input should be an object"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}]},
     400, "a tool_use block has a string id and name and an object input"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                  "content": [{"type": "image", "source": {}}]}]}]},
     400, "messages[0].content[0].content[0] of type 'image' is not supported here"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     400, "of type 'tool_use' is not supported"),
    ({"system": [{"type": "image"}]}, 400, "system[0] of type 'image' is not supported here"),
])
def test_what_the_server_does_not_do_is_refused_in_anthropics_shape(served, kw, status, says):
    body = {"model": "a", "max_tokens": 4, "messages": ASK, **kw}
    r = httpx.post(served["url"] + "/v1/messages", headers={"x-api-key": "k"}, json=body)
    assert r.status_code == status and r.json()["type"] == "error", r.text
    assert says in r.json()["error"]["message"] and r.json()["error"]["type"] == (
        "not_found_error" if status == 404 else "invalid_request_error"), r.text
    assert httpx.post(served["url"] + "/v1/messages", headers={"x-api-key": "k"},
                      content=b"{not json").json()["error"]["message"] == "request body is not valid JSON"
