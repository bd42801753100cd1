"""OpenAI's Responses API (``/v1/responses``) through the real openai SDK against a served bundle: answers equal
the chat completion of the same conversation, streamed events add up to the stored response, a stored
response continues with ``previous_response_id``, function calls go out and their outputs come back, and
what the server does not do is refused by name."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

import branchmerge
from branchmerge.server import ServerLimits, create_app
from branchmerge.server.responses import ResponseStore
from tests.serving import serving, wait_queued


@pytest.fixture(scope="module")
def served(bundles):
    b = branchmerge.load(bundles[0.9], dtype="float32")
    app = create_app(b, max_batch=4, wait_ms=5, limits=ServerLimits(max_stored_responses=3))
    with serving(app) as url:
        yield {"url": url, "app": app, "client": openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                                                 timeout=60)}


def _chat(c, messages, **kw):
    out = c.chat.completions.create(model="a", messages=messages, temperature=0, **kw)
    return out.choices[0].message.content, out.usage, out.choices[0].finish_reason


def test_a_response_is_the_chat_answer_of_the_same_conversation(served):
    c = served["client"]
    r = c.responses.create(model="a", input="rev abc=", max_output_tokens=5, temperature=0)
    text, usage, reason = _chat(c, [{"role": "user", "content": "rev abc="}], max_tokens=5)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text == text
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert r.status == ("incomplete" if reason == "length" else "completed")
    if reason == "length":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.model_extra["branch"] == "a" and r.max_output_tokens == 5
    # instructions and a list of items are a system message and the conversation
    items = [{"role": "user", "content": "dup ab="}, {"role": "assistant", "content": "abab"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "rev xy="}]}]
    r = c.responses.create(model="a", input=items, instructions="be brief", max_output_tokens=4, temperature=0)
    text, *_ = _chat(c, [{"role": "system", "content": "be brief"}, *items[:2], {"role": "user", "content": "rev xy="}],
                     max_tokens=4)
    assert r.output_text == text and r.instructions == "be brief"


def test_streamed_events_add_up_to_the_response(served):
    c = served["client"]
    plain = c.responses.create(model="b", input="rev hello=", max_output_tokens=6, temperature=0)
    events = list(c.responses.create(model="b", input="rev hello=", max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas == done.output_text == plain.output_text
    assert next(e for e in events if e.type == "response.output_text.done").text == deltas
    assert kinds.index("response.output_item.added") < kinds.index("response.content_part.added") \
        < kinds.index("response.output_text.done") < kinds.index("response.output_item.done")
    assert done.usage.output_tokens == plain.usage.output_tokens and done.status == plain.status
    assert c.responses.retrieve(done.id).output_text == deltas  # stored when it ended


def test_previous_response_id_continues_the_conversation(served):
    c = served["client"]
    first = c.responses.create(model="a", input="rev ab=", max_output_tokens=3, temperature=0,
                               instructions="not carried over")
    second = c.responses.create(model="a", input="dup c=", previous_response_id=first.id, max_output_tokens=3,
                                temperature=0)
    text, *_ = _chat(c, [{"role": "user", "content": "rev ab="}, {"role": "assistant", "content": first.output_text},
                         {"role": "user", "content": "dup c="}], max_tokens=3)
    assert second.output_text == text and second.previous_response_id == first.id
    got = c.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    items = c.responses.input_items.list(second.id)
    assert [i.role for i in items.data] == ["user"] and items.data[0].content[0].text == "dup c="
    c.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError, match=second.id):
        c.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError, match="previous_response_id 'resp_nope' is not a stored response"):
        c.responses.create(model="a", input="x", previous_response_id="resp_nope")
    unstored = c.responses.create(model="a", input="rev a=", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_the_store_keeps_the_newest_responses(served):
    """At most 3 here (``max_stored_responses``): the least recently used goes first."""
    c = served["client"]
    ids = [c.responses.create(model="c", input=f"rev {x}=", max_output_tokens=1).id for x in "abcd"]
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(ids[0])
    assert all(c.responses.retrieve(i).id == i for i in ids[1:])
    metrics = httpx.get(served["url"] + "/metrics").text  # the store's size, on /metrics
    assert "branchmerge_stored_responses 3" in metrics and "branchmerge_stored_responses_chars " in metrics
    store = ResponseStore(max_responses=10, max_chars=200)
    for k in range(4):
        store.put({"id": f"r{k}"}, [], [{"role": "user", "content": "x" * 60}])
    assert store.get("r0") is None and store.get("r3") is not None and store.chars <= 200
    store.put({"id": "huge"}, [], [{"role": "user", "content": "x" * 500}])  # past the whole budget: not kept
    assert store.get("huge") is None and store.get("r3") is not None


def test_text_format_json_schema_structures_the_answer(served):
    c = served["client"]
    schema = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 3}}, "required": ["w"],
              "additionalProperties": False}
    r = c.responses.create(model="b", input="rev ab=", max_output_tokens=30, temperature=0,
                           text={"format": {"type": "json_schema", "name": "w", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"w"}


@pytest.mark.parametrize("kw, param, says", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input", "input[0].content[0] of type 'input_image' is not supported"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "input[0] of type 'reasoning' is not supported"),
    ({"input": []}, "input", "input must be a non-empty"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "input[0].role must be"),
    ({"tools": [{"type": "web_search"}]}, "tools", "tools[0] of type 'web_search' is not supported"),
    ({"background": True}, "background", "`background` is not supported"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "`reasoning` is not supported"),
    ({"truncation": "auto"}, "truncation", "`truncation` is not supported"),
    ({"include": ["file_search_call.results"]}, "include", "include 'file_search_call.results' is not supported"),
    ({"max_output_tokens": 10 ** 6}, "max_output_tokens", "max_output_tokens 1000000 is above"),
    ({"temperature": 5}, "temperature", "temperature: Input should be less than or equal to 2"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "text.format is"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "metadata has at most 16 keys"),
])
def test_what_the_server_does_not_do_is_refused_by_name(served, kw, param, says):
    c = served["client"]
    with pytest.raises(openai.BadRequestError, match="^Error code: 400") as e:
        c.responses.create(**{"model": "a", "input": "rev a=", **kw})
    err = e.value.body
    assert says in err["message"] and err["param"] == param, err


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"model": "a", "input": "rev abcdef=", "stream": True, "max_output_tokens": 20}),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "rev abcdef="}],
                              "stream": True, "max_tokens": 20}),
])
def test_a_streaming_client_that_goes_away_stops_its_work(served, path, body):
    """Its job still waits in the queue (the engine is paused) when it hangs up after its first events: the
    job leaves the queue at once. (Before, Starlette saw the client gone only at the next send, so the job
    stayed queued, then ran its prefill for nobody.)"""
    engine = served["app"].state.engine
    with engine.paused():
        seen, leave = [], threading.Event()

        def client():
            with httpx.stream("POST", served["url"] + path, json=body, timeout=30) as r:
                for line in r.iter_lines():
                    seen.append(line)
                    if line.startswith("data:"):
                        assert leave.wait(30)
                        return  # gone, its answer not yet begun

        th = threading.Thread(target=client)
        th.start()
        wait_queued(engine, 1)
        leave.set()
        th.join(timeout=30)
        end = time.monotonic() + 15
        while engine.queued() and time.monotonic() < end:
            time.sleep(0.05)
        assert seen and engine.queued() == 0


def test_a_conversation_grown_past_the_limit_is_refused_by_name(bundles):
    """previous_response_id chains: each turn carries the whole conversation, which is bounded as chat's
    messages are (max_prompt_chars); past it, a 400 names input, and nothing is stored for it."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    with serving(create_app(b, max_batch=4, wait_ms=5, limits=ServerLimits(max_prompt_chars=60))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        prev = None
        with pytest.raises(openai.BadRequestError) as e:
            for _ in range(10):
                prev = c.responses.create(model="a", input="rev abcdefgh=", max_output_tokens=4, temperature=0,
                                          previous_response_id=prev.id if prev else None)
        assert prev is not None and "input has" in e.value.body["message"] and "at most 60" in e.value.body["message"]
        assert e.value.body["param"] == "input"


def test_bodies_that_cannot_be_parsed_get_openais_error_shape(served):
    """A body nested a million deep, a path that does not exist: OpenAI's error JSON, not FastAPI's."""
    deep = b'{"model": "a", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/responses", "/v1/chat/completions"):
        r = httpx.post(served["url"] + path, content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.get(served["url"] + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_logprobs_of_the_output_text(served):
    """top_logprobs (or include message.output_text.logprobs) gives each output token's log-probability, as
    chat's logprobs for the same answer; streamed deltas carry their own tokens'."""
    c = served["client"]
    r = c.responses.create(model="a", input="rev abc=", max_output_tokens=5, temperature=0, top_logprobs=2)
    lps = r.output[0].content[0].logprobs
    chat = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "rev abc="}], max_tokens=5,
                                     temperature=0, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [(lp.token, round(lp.logprob, 5)) for lp in lps] == [(lp.token, round(lp.logprob, 5)) for lp in chat]
    assert len(lps) == r.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in lps)
    only = c.responses.create(model="a", input="rev abc=", max_output_tokens=5, temperature=0,
                              include=["message.output_text.logprobs"])
    assert [lp.token for lp in only.output[0].content[0].logprobs] == [lp.token for lp in lps]
    events = list(c.responses.create(model="a", input="rev abc=", max_output_tokens=5, temperature=0, top_logprobs=2,
                                     stream=True))
    streamed = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert streamed == [lp.token for lp in lps]
