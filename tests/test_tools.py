"""Tool calling (OpenAI's ``tools``/``tool_choice``) through structured outputs, with the real ``openai``
SDK: a named function or ``"required"`` calls come back as ``tool_calls`` (streamed too), a conversation
goes on with the call and its result, and what this server cannot do is refused by name."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import branchmerge
from branchmerge.config import load_config
from branchmerge.merge import run_merge
from branchmerge.runtime.text import describe_tools, encode_messages
from branchmerge.server import create_app
from branchmerge.server.tool_parsers import PARSERS, parse_hermes
from tests.conftest import make_finetune, make_tiny_llama, save_char_tokenizer, write_config
from tests.serving import serving

ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
NEG = {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "add two numbers", "parameters": ADD}},
         {"type": "function", "function": {"name": "neg", "parameters": NEG}}]
ASK = [{"role": "user", "content": "add 1+2="}]


def _valid_call(call) -> None:
    args = json.loads(call.function.arguments)
    if call.function.name == "add":
        assert set(args) == {"a", "b"} and all(isinstance(v, int) and 0 <= v <= 99 for v in args.values()), args
    else:
        assert call.function.name == "neg" and set(args) == {"x"} and isinstance(args["x"], bool), args
    assert call.type == "function" and call.id.startswith("call_")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two branches of a tiny model with a 2,048-token context (tool descriptions are long) and a chat
    template that renders neither tools nor tool calls."""
    root = tmp_path_factory.mktemp("tools")
    base = make_tiny_llama(root / "base", max_position_embeddings=2048)
    for i, n in enumerate("ab"):
        make_finetune(base, root / n, seed=200 + i)
        save_char_tokenizer(root / n, chat=True)
    cfg = write_config(root / "c.yaml", [{"name": n, "model": str(root / n)} for n in "ab"], compress_rate=0.5)
    run_merge(load_config(cfg), root / "bundle", progress=False)
    bundle = branchmerge.load(root / "bundle")
    with serving(create_app(bundle, max_batch=8, wait_ms=20, max_tokens_limit=256)) as url, \
            serving(create_app(bundle, max_batch=8, wait_ms=20, max_tokens_limit=256, tool_call_parser="hermes")) as h, \
            serving(create_app(bundle, max_batch=8, wait_ms=20, max_tokens_limit=256,
                               tool_call_parser="llama3_json")) as j:
        yield {"url": url, "bundle": bundle,
               "client": openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60),
               "hermes": openai.OpenAI(base_url=h + "/v1", api_key="x", max_retries=0, timeout=60),
               "llama3_json": openai.OpenAI(base_url=j + "/v1", api_key="x", max_retries=0, timeout=60)}


def test_a_template_without_tools_gets_them_in_a_system_message(server):
    tok = server["bundle"].tokenizer("a")
    assert "tools" not in tok.chat_template
    with_tools = encode_messages(tok, ASK, tools=TOOLS)
    assert with_tools == encode_messages(tok, [{"role": "system", "content": describe_tools(TOOLS)}, *ASK])
    sys_first = [{"role": "system", "content": "be brief"}, *ASK]
    assert encode_messages(tok, sys_first, tools=TOOLS) == encode_messages(
        tok, [{"role": "system", "content": "be brief\n\n" + describe_tools(TOOLS)}, *ASK])
    # a template that renders tools gets them as they are
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = "{% for t in tools %}{{ t['function']['name'] }},{% endfor %}" + tok.chat_template
    assert tok2.decode(encode_messages(tok2, ASK, tools=TOOLS)).startswith("add,neg,")


def test_named_and_required_tool_calls(server):
    c = server["client"]
    r = c.chat.completions.create(model="a", messages=ASK, tools=TOOLS, max_tokens=80,
                                  tool_choice={"type": "function", "function": {"name": "neg"}})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and msg.content is None and len(msg.tool_calls) == 1
    assert msg.tool_calls[0].function.name == "neg"
    _valid_call(msg.tool_calls[0])
    r = c.chat.completions.create(model="b", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
                                  parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    _valid_call(r.choices[0].message.tool_calls[0])
    # streamed: the same calls, in one delta before the finish reason
    chunks = list(c.chat.completions.create(model="b", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=200, parallel_tool_calls=False, stream=True))
    deltas = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(d.function.name, d.function.arguments) for d in deltas[0]] == \
        [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls]
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)


def test_a_conversation_goes_on_with_the_call_and_its_result(server):
    """The call and the tool's result are part of the next prompt (here, a template that does not render
    tool_calls: the call as the assistant message's JSON)."""
    c, b = server["client"], server["bundle"]
    r = c.chat.completions.create(model="a", messages=ASK, tools=TOOLS, max_tokens=80,
                                  tool_choice={"type": "function", "function": {"name": "add"}})
    call = r.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "3"}]
    r2 = c.chat.completions.create(model="a", messages=history, max_tokens=6)
    as_text = [*ASK, {"role": "assistant",
                      "content": json.dumps([{"name": "add", "arguments": call.function.arguments}])},
               {"role": "tool", "content": "3"}]
    assert r2.choices[0].message.content == b.generate_ids([b.encode_messages(as_text, "a")], ["a"],
                                                           max_new_tokens=6)[0].text


def test_an_answer_cut_short_stays_text(server):
    r = server["client"].chat.completions.create(model="a", messages=ASK, tools=TOOLS, max_tokens=3,
                                                 tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(("body", "param", "msg"), [
    ({"tools": TOOLS}, "tool_choice", 'tool_choice "auto"'),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "parser"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", '"required"'),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "add"}}, "tool_choice", '"required"'),
    ({"tools": [*TOOLS, TOOLS[0]], "tool_choice": "required"}, "tools", "'add' twice"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "both set"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools", "not a usable JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "nope"}}}],
      "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tools[x].parameters", "JSON schema"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 5}}]}]},
     "messages", "tool_calls are"),
])
def test_bad_tool_requests_get_a_400_that_names_the_field(server, body, param, msg):
    r = httpx.post(server["url"] + "/v1/chat/completions",
                   json={"model": "a", "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and msg in err["message"], err


@pytest.mark.parametrize("tools", [[{"type": "function", "function": {"name": "has space"}}],
                                   [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)],
                                   [{"type": "code_interpreter"}]])
def test_malformed_tools_are_refused(server, tools):
    r = httpx.post(server["url"] + "/v1/chat/completions",
                   json={"model": "a", "messages": ASK, "max_tokens": 5, "tools": tools, "tool_choice": "required"})
    assert r.status_code == 400 and "tools" in r.text, r.text


@pytest.mark.parametrize(("text", "content", "calls"), [
    ("no call here", "no call here", []),
    ('ok <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "ok", [("add", {"a": 1})]),
    ('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 2}"}\n</tool_call>\n<tool_call>{"name": "neg", '
     '"arguments": {"x": true}}</tool_call>', None, [("add", {"a": 2}), ("neg", {"x": True})]),
    ('<tool_call>{"name": "add", "arguments": {}}', None, [("add", {})]),  # cut before its closing tag
    ('<tool_call>{"name": "add", "argu', '<tool_call>{"name": "add", "argu', []),  # not JSON: all text
    ('<tool_call>["add"]</tool_call>', '<tool_call>["add"]</tool_call>', []),
])
def test_hermes_calls_are_read_out_of_an_answer(text, content, calls):
    got_content, got = parse_hermes(text)
    assert got_content == content and [(c["name"], c["parameters"]) for c in got] == calls


def test_auto_tool_choice_with_the_hermes_parser(server):
    """With ``--tool-call-parser hermes``, ``tool_choice: "auto"`` (the default with tools) answers freely: an
    answer without ``<tool_call>`` blocks is text, one with them comes back as ``tool_calls`` (here the model
    is made to write one with a regular expression), streamed too."""
    h, b = server["hermes"], server["bundle"]
    plain = h.chat.completions.create(model="a", messages=ASK, tools=TOOLS, max_tokens=8)
    msgs = [{"role": "system", "content": describe_tools(TOOLS)}, *ASK]
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content == b.generate_ids([b.encode_messages(msgs, "a")], ["a"],
                                                              max_new_tokens=8)[0].text
    forced = {"structured_outputs": {"regex": r'ok <tool_call>\{"name": "add", "arguments": \{"a": 1, "b": 2\}\}'
                                              r'</tool_call>'}}
    r = h.chat.completions.create(model="a", messages=ASK, tools=TOOLS, max_tokens=80, extra_body=forced)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "ok"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [("add", {"a": 1, "b": 2})]
    chunks = list(h.chat.completions.create(model="a", messages=ASK, tools=TOOLS, max_tokens=80, extra_body=forced,
                                            stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    # the text before the call streams as it comes (then the call is held until it is whole)
    texts = [d.content for d in deltas if d.content]
    assert "".join(texts).strip() == "ok" and len(texts) >= 2 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(d.tool_calls for d in deltas[:-1] if d.content)
    assert [(t.function.name, t.function.arguments) for d in deltas for t in d.tool_calls or []] == \
        [(t.function.name, t.function.arguments) for t in msg.tool_calls]
    # a free answer with no call streams token by token, as without tools
    free = [ch.choices[0].delta.content for ch in h.chat.completions.create(
        model="a", messages=ASK, tools=TOOLS, max_tokens=8, stream=True) if ch.choices and ch.choices[0].delta.content]
    assert "".join(free) == plain.choices[0].message.content and len(free) >= 4


def test_auto_tool_choice_with_the_llama3_json_parser(server):
    """``--tool-call-parser llama3_json``: an answer that is call objects (here made so by a regular expression;
    the test vocabulary has no ``;`` to separate them) comes back as ``tool_calls`` with no content, streamed with none of it as text; one that is not streams."""
    j = server["llama3_json"]
    forced = {"structured_outputs": {"regex": r'\{"name": "add", "parameters": \{"a": 1, "b": 2\}\} '
                                              r'\{"name": "neg", "parameters": \{"x": true\}\}'}}
    r = j.chat.completions.create(model="b", messages=ASK, tools=TOOLS, max_tokens=120, extra_body=forced)
    msg = r.choices[0].message
    assert msg.content is None and r.choices[0].finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == \
        [("add", {"a": 1, "b": 2}), ("neg", {"x": True})]
    chunks = [ch.choices[0] for ch in j.chat.completions.create(model="b", messages=ASK, tools=TOOLS, max_tokens=120,
                                                                 extra_body=forced, stream=True) if ch.choices]
    assert not any(ch.delta.content for ch in chunks)
    assert [t.function.name for ch in chunks for t in ch.delta.tool_calls or []] == ["add", "neg"]
    half = {"structured_outputs": {"regex": r'\{"name": "add", "parameters": \{"a": 1'}}  # not a whole call: text
    r = j.chat.completions.create(model="b", messages=ASK, tools=TOOLS, max_tokens=60, extra_body=half)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == '{"name": "add", "parameters": {"a": 1'
    streamed = "".join(ch.choices[0].delta.content or "" for ch in j.chat.completions.create(
        model="b", messages=ASK, tools=TOOLS, max_tokens=60, extra_body=half, stream=True) if ch.choices)
    assert streamed == r.choices[0].message.content


@pytest.mark.parametrize(("parser", "text", "content", "calls"), [
    ("llama3_json", '{"name": "add", "parameters": {"a": 1}}', None, [("add", {"a": 1})]),
    ("llama3_json", '<|python_tag|>{"name": "add", "arguments": {"a": 1}}; {"name": "neg", "parameters": {}}', None,
     [("add", {"a": 1}), ("neg", {})]),
    ("llama3_json", 'The sum is {"name": "add"}', 'The sum is {"name": "add"}', []),  # not at the start
    ("llama3_json", '{"name": "add", "parameters": {"a": 1}} and more', '{"name": "add", "parameters": {"a": 1}} and '
     'more', []),
    ("llama3_json", '{"nom": "add"}', '{"nom": "add"}', []),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "neg", "arguments": "{}"}]',
     "Sure.", [("add", {"a": 1}), ("neg", {})]),
    ("mistral", '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]neg[ARGS]{"x": true}', None,
     [("add", {"a": 1}), ("neg", {"x": True})]),
    ("mistral", '[TOOL_CALLS][{"name": "add", "argu', '[TOOL_CALLS][{"name": "add", "argu', []),
    ("mistral", "no calls", "no calls", []),
    ("pythonic", '[add(a=1, b=2), neg(x=True)]', None, [("add", {"a": 1, "b": 2}), ("neg", {"x": True})]),
    ("pythonic", '[get.weather(city="Paris", opts={"unit": "c", "days": [1, 2]})]', None,
     [("get.weather", {"city": "Paris", "opts": {"unit": "c", "days": [1, 2]}})]),
    # hostile or broken: read as text, never run
    ("pythonic", '[add(a=__import__("os").system("echo hi"))]', '[add(a=__import__("os").system("echo hi"))]', []),
    ("pythonic", "[add(1, 2)]", "[add(1, 2)]", []),  # positional arguments: not a call we can name
    ("pythonic", "[add(**{'a': 1})]", "[add(**{'a': 1})]", []),
    ("pythonic", "[add(a={1, 2})]", "[add(a={1, 2})]", []),  # a set is not JSON
    ("pythonic", "[" * 5000, "[" * 5000, []),
    ("pythonic", "[add(a=1)", "[add(a=1)", []),
    ("pythonic", "I'd call [add(a=1)]", "I'd call [add(a=1)]", []),
])
def test_other_parsers_read_their_formats(parser, text, content, calls):
    got_content, got = PARSERS[parser].parse(text)
    assert got_content == content and [(c["name"], c["parameters"]) for c in got] == calls


@pytest.mark.parametrize(("parser", "text", "safe"), [
    ("hermes", "hello <tool", 6), ("hermes", "hello <tool_call>{", 6), ("hermes", "hello", 5), ("hermes", "a <b", 4), ("hermes", "a <t", 2),
    ("mistral", "ok [TOOL", 3), ("mistral", "ok [x", 5),
    ("llama3_json", "  ", 0), ("llama3_json", ' {"na', 0), ("llama3_json", "<|pyth", 0), ("llama3_json", "Hi {", 4),
    ("pythonic", "[ad", 0), ("pythonic", "<|python_st", 0), ("pythonic", "The answer", 10),
])
def test_what_streams_before_a_call_may_begin(parser, text, safe):
    assert PARSERS[parser].safe(text) == safe


def test_responses_api_function_calls_go_out_and_their_outputs_come_back(server):
    """/v1/responses: function tools in the Responses form come back as function_call items (streamed too),
    and a function_call_output continues the conversation as the chat path's tool message does."""
    c = server["client"]
    tool = {"type": "function", "name": "add", "description": "add two numbers", "parameters": ADD}
    r = c.responses.create(model="a", input="add 1+2=", tools=[tool], max_output_tokens=80, temperature=0,
                           tool_choice={"type": "function", "name": "add"})
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add" and calls[0].call_id.startswith("call_")
    args = json.loads(calls[0].arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    assert not [o for o in r.output if o.type == "message"]  # a forced call: no text
    streamed = list(c.responses.create(model="a", input="add 1+2=", tools=[tool], max_output_tokens=80,
                                       temperature=0, tool_choice={"type": "function", "name": "add"}, stream=True))
    assert [e.arguments for e in streamed if e.type == "response.function_call_arguments.done"] == \
        [calls[0].arguments]
    assert streamed[-1].type == "response.completed" and streamed[-1].response.output[0].name == "add"
    back = c.responses.create(model="a", previous_response_id=r.id, max_output_tokens=4, temperature=0,
                              tools=[tool], tool_choice="none",
                              input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "3"}])
    chat = c.chat.completions.create(model="a", max_tokens=4, temperature=0, tools=TOOLS[:1], tool_choice="none",
                                     messages=[*ASK, {"role": "assistant", "content": "", "tool_calls": [
                                         {"id": calls[0].call_id, "type": "function",
                                          "function": {"name": "add", "arguments": calls[0].arguments}}]},
                                         {"role": "tool", "tool_call_id": calls[0].call_id, "content": "3"}])
    assert back.output_text == chat.choices[0].message.content


def test_messages_api_tool_use_goes_out_and_its_result_comes_back(server):
    """/v1/messages (the anthropic SDK): a forced tool comes back as a tool_use block with its input object
    (stop_reason tool_use; streamed as input_json_delta too), and a tool_result continues the conversation
    as the chat path's tool message does."""
    import anthropic

    c = anthropic.Anthropic(base_url=server["url"], api_key="x", max_retries=0, timeout=60)
    tool = {"name": "add", "description": "add two numbers", "input_schema": ADD}
    m = c.messages.create(model="a", max_tokens=80, messages=[{"role": "user", "content": "add 1+2="}], tools=[tool],
                          tool_choice={"type": "tool", "name": "add"}, extra_body={"temperature": 0})
    assert [b.type for b in m.content] == ["tool_use"] and m.stop_reason == "tool_use"
    use = m.content[0]
    assert use.name == "add" and set(use.input) == {"a", "b"} and all(isinstance(v, int) for v in use.input.values())
    with c.messages.stream(model="a", max_tokens=80, messages=[{"role": "user", "content": "add 1+2="}], tools=[tool],
                           tool_choice={"type": "tool", "name": "add"}, extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == use.input
    assert final.stop_reason == "tool_use"
    back = c.messages.create(model="a", max_tokens=4, tools=[tool], tool_choice={"type": "none"},
                             extra_body={"temperature": 0}, messages=[
                                 {"role": "user", "content": "add 1+2="},
                                 {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "add",
                                                                    "input": use.input}]},
                                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                               "content": "3"}]}])
    chat = server["client"].chat.completions.create(
        model="a", max_tokens=4, temperature=0, tools=TOOLS[:1], tool_choice="none", messages=[
            *ASK, {"role": "assistant", "content": "", "tool_calls": [
                {"id": use.id, "type": "function", "function": {"name": "add", "arguments": json.dumps(use.input)}}]},
            {"role": "tool", "tool_call_id": use.id, "content": "3"}])
    assert back.content[0].text == chat.choices[0].message.content
