"""Structured outputs (OpenAI's ``response_format``, vLLM's ``structured_outputs``): answers that follow a
JSON schema, a regular expression, a choice or a grammar, in mixed batches, across continuous-batching
segments, and through the server with the real ``openai`` SDK; and the bad specs a client can send."""

from __future__ import annotations

import json
import re
import time
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

import branchmerge
from branchmerge.runtime.sampling import RowSampler, RowSettings
from branchmerge.runtime.structured import MAX_SPEC_CHARS, Structure, StructureError
from branchmerge.server import create_app
from branchmerge.server.engine import Engine, Job
from branchmerge.staged import PipelinesConfig
from tests.serving import serving

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "enum": ["yes", "no"]},
    "sure": {"type": "boolean"},
    "score": {"type": "integer", "minimum": 0, "maximum": 99},
}, "required": ["answer", "sure", "score"], "additionalProperties": False}


def _check(structure: Structure, text: str) -> None:
    """Fails unless ``text`` is an answer ``structure`` allows."""
    if structure.kind == "regex":
        assert re.fullmatch(structure.spec, text), (structure.spec, text)
    elif structure.kind == "choice":
        assert text in json.loads(structure.spec), text
    elif structure.kind == "json":
        obj = json.loads(text)
        assert set(obj) == {"answer", "sure", "score"} and obj["answer"] in ("yes", "no"), obj
        assert isinstance(obj["sure"], bool) and isinstance(obj["score"], int) and 0 <= obj["score"] <= 99, obj
    elif structure.kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    else:
        assert text in ("ab", "abab", "ababab"), text


STRUCTURES = [
    Structure("regex", r"[0-9]{3}-[a-c]{1,4}"),
    Structure.choices(["yes", "no", "maybe so"]),
    Structure.json_schema(SCHEMA),
    Structure("grammar", 'root ::= "ab" rest\nrest ::= "" | "ab" | "ab" "ab"'),
]


def test_each_row_follows_its_own_structure_in_a_mixed_batch(loaded):
    """Rows of three branches, greedy and seeded, each with another structure (or none), in one batch: every
    structured answer is one its structure allows and ends there (finish reason stop); every row, the
    unstructured ones too, gets the answer it gets alone."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    prompts = ["add 1+2=", "rev abc=", "key zz=", "add 12+30=", "rev hello=", "key ab="]
    rows = [RowSettings(structure=STRUCTURES[0]), RowSettings(),
            RowSettings(temperature=0.9, seed=7, structure=STRUCTURES[1]),
            RowSettings(structure=STRUCTURES[2]), RowSettings(temperature=1.0, seed=3),
            RowSettings(temperature=0.7, seed=11, structure=STRUCTURES[3])]
    names = ["a", "b", "c", "a", "b", "c"]
    ids = [tok.encode(p) for p in prompts]
    out = b.generate_ids(ids, names, max_new_tokens=60, row_sampler=RowSampler(rows))
    for o, st in zip(out, rows):
        if st.structure is not None:
            _check(st.structure, o.text)
            assert o.finish_reason == "stop", (st.structure, o.text)
    for i, (o, st) in enumerate(zip(out, rows)):
        alone = b.generate_ids([ids[i]], [names[i]], max_new_tokens=60, row_sampler=RowSampler([st]))[0]
        assert (o.new_ids, o.finish_reason) == (alone.new_ids, alone.finish_reason), i
    # the unstructured greedy row is the plain model's answer, which these constraints would not allow
    plain = b.generate_ids([ids[0]], ["a"], max_new_tokens=60)[0]
    assert out[1].new_ids == b.generate_ids([ids[1]], ["b"], max_new_tokens=60)[0].new_ids
    assert not re.fullmatch(STRUCTURES[0].spec, plain.text)


def test_json_object_starts_and_ends_an_object(loaded):
    """Any JSON object: the first token must open it; with the closing brace favoured, it closes at once."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    close = tok.convert_tokens_to_ids("}")
    out = b.generate_ids([tok.encode("add 1+2=")] * 2, ["a", "b"], max_new_tokens=30, row_sampler=RowSampler([
        RowSettings(structure=Structure("json_object")),
        RowSettings(structure=Structure("json_object"), logit_bias={close: 100.0})]))
    assert out[1].text == "{}" and out[1].finish_reason == "stop"
    assert out[0].text.startswith("{")
    if out[0].finish_reason == "stop":
        assert isinstance(json.loads(out[0].text), dict)


def test_a_structured_job_goes_on_across_segments(loaded):
    """Structured jobs that join a running batch keep their grammar state from one segment to the next:
    each answer is the one it gets alone, and follows its structure."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    engine = Engine(b, max_batch=4, wait_ms=0, min_segment=2)
    long = engine.submit(Job(tok.encode("rev hello="), "a", 80, sampling=RowSettings(ignore_eos=True)))
    end = time.monotonic() + 30
    while engine.running == 0:
        assert time.monotonic() < end
        time.sleep(0.001)
    jobs = engine.submit_many([Job(tok.encode("add 5+5="), "b", 60, sampling=RowSettings(structure=STRUCTURES[2])),
                               Job(tok.encode("key zz="), "c", 40, sampling=RowSettings(
                                   temperature=0.8, seed=5, structure=STRUCTURES[0]))])
    for j in [long, *jobs]:
        assert j.finished.wait(120) and j.error is None
    assert engine.segments >= 3
    for j in jobs:
        alone = b.generate_ids([j.ids], [j.branch], max_new_tokens=j.max_tokens,
                               row_sampler=RowSampler([j.sampling]))[0]
        assert (j.new_ids, j.stop_id) == (alone.new_ids, alone.stop_id)
        _check(j.sampling.structure, alone.text)


@pytest.mark.parametrize(("structure", "msg"), [
    (Structure("json", '{"type": "nope"}'), "not a usable JSON schema"),
    (Structure("json", "{not json"), "not valid JSON"),
    (Structure("json", "[1, 2]"), "must be a JSON schema"),
    (Structure("regex", "[a-"), "not a usable regular expression"),
    (Structure("regex", ""), "empty regular expression"),
    (Structure("grammar", "root ::= "), "not a usable EBNF grammar"),
    (Structure("choice", "[]"), "non-empty list"),
    (Structure("choice", '["a", ""]'), "non-empty list"),
    (Structure.choices([str(i) for i in range(2000)]), "at most"),
    (Structure("regex", "a" * (MAX_SPEC_CHARS + 1)), "at most"),
    (Structure("xml", "<a/>"), "unknown structure kind"),  # type: ignore[arg-type]
])
def test_bad_specs_are_named(structure, msg):
    with pytest.raises(StructureError, match=msg) as e:
        structure.check()
    assert structure.field in str(e.value) and "/project/" not in str(e.value)  # (xgrammar's source path cut)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    bundle = branchmerge.load(bundles[0.9])
    pipes = PipelinesConfig.model_validate({"pipelines": [{"name": "two", "stages": [
        {"branch": "a", "user": "{question}", "max_tokens": 4},
        {"branch": "b", "user": "{previous}", "max_tokens": 16}]}]})
    app = create_app(bundle, pipelines=pipes, max_batch=8, wait_ms=20, max_tokens_limit=64)
    with serving(app) as url:
        yield {"url": url, "bundle": bundle, "pipes": pipes,
               "client": openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)}


def test_openai_sdk_parses_a_schema_answer(server):
    """The SDK's ``parse`` sends the Pydantic model as a strict JSON schema and reads the answer back into it."""
    c = server["client"]
    close = server["bundle"].tokenizer("c").convert_tokens_to_ids("}")
    r = c.chat.completions.parse(model="a", messages=[{"role": "user", "content": "rev abc="}],
                                 response_format=Verdict, max_tokens=40)
    assert isinstance(r.choices[0].message.parsed, Verdict) and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "add 1+2="}], max_tokens=64,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "v", "schema": SCHEMA, "strict": True}})
    _check(STRUCTURES[2], r.choices[0].message.content)
    r = c.chat.completions.create(model="c", messages=[{"role": "user", "content": "key zz="}], max_tokens=40,
                                  response_format={"type": "json_object"}, logit_bias={str(close): 100})
    assert r.choices[0].message.content == "{}"


def test_vllm_fields_stream_and_batch(server):
    """vLLM's ``structured_outputs`` (and its older ``guided_*``) on completions: streamed, the chunks make the
    non-streamed answer; every prompt of a batch and every choice of ``n`` follows the structure."""
    c = server["client"]
    so = {"structured_outputs": {"regex": r"[0-9]{2}(\.[0-9])?"}}
    whole = c.completions.create(model="a", prompt="add 1+2=", max_tokens=20, extra_body=so)
    text = whole.choices[0].text
    assert re.fullmatch(r"[0-9]{2}(\.[0-9])?", text) and whole.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="a", prompt="add 1+2=", max_tokens=20, extra_body=so, stream=True) if ch.choices)
    assert streamed == text
    r = c.completions.create(model="b", prompt=["rev abc=", "key zz=", "add 5+5="], max_tokens=10, n=2,
                             temperature=1.0, seed=1, extra_body={"guided_choice": ["left", "right"]})
    assert len(r.choices) == 6 and all(ch.text in ("left", "right") for ch in r.choices)
    r = c.completions.create(model="c", prompt="rev abc=", max_tokens=10,
                             extra_body={"structured_outputs": {"grammar": 'root ::= ("x" | "y") "=" [0-9]'}})
    assert re.fullmatch(r"[xy]=[0-9]", r.choices[0].text)


@pytest.mark.parametrize(("body", "param", "msg"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "not a usable JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "text, json_object or json_schema"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "regular expression"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "not supported"),
    ({"structured_outputs": "json"}, "structured_outputs", "must be an object"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object", "must be true"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"structured_outputs": {"choice": [1, 2]}}, "structured_outputs.choice", "list of strings"),
    ({"structured_outputs": {"json": "x" * (MAX_SPEC_CHARS + 10)}}, "structured_outputs.json", "at most"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar", "EBNF"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex", "give one of"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs.regex", "given twice"),
    ({"model": "two", "structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "regular expression"),
])
def test_bad_structures_get_a_400_that_names_the_field(server, body, param, msg):
    r = httpx.post(server["url"] + "/v1/chat/completions",
                   json={"model": "a", "messages": [{"role": "user", "content": "add 1+2="}], "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and msg in err["message"], err
    ok = server["client"].completions.create(model="a", prompt="add 1+1=", max_tokens=3)  # still serving
    assert ok.choices[0].text == server["bundle"].generate("add 1+1=", "a", max_new_tokens=3)[0]


def test_a_pipeline_formats_its_final_answer_to_the_request_structure(server):
    """A pipeline's last stage (the one that formats) follows the request's structure, stage 1 answers freely:
    the server's stages equal the library's ``run_pipeline`` with the same structure, through chat and
    completions, streamed too; tool calls come out of a pipeline as from a branch."""
    from branchmerge.staged import run_pipeline

    c, b, pipe = server["client"], server["bundle"], server["pipes"].get("two")
    st = Structure.from_options({"regex": r"[0-9]{2}-[a-c]"})
    want = run_pipeline(b, pipe, ["rev abc="], structure=st)[0]
    free = run_pipeline(b, pipe, ["rev abc="])[0]
    assert [s.text for s in want][:1] == [s.text for s in free][:1]  # stage 1 unconstrained
    assert re.fullmatch(r"[0-9]{2}-[a-c]", want[1].text) and want[1].text != free[1].text
    r = c.chat.completions.create(model="two", messages=[{"role": "user", "content": "rev abc="}], max_tokens=8,
                                  extra_body={"structured_outputs": {"regex": r"[0-9]{2}-[a-c]"}})
    assert r.choices[0].message.content == want[1].text and r.choices[0].finish_reason == "stop"
    assert [s["text"] for s in r.model_extra["stages"]] == [s.text for s in want]
    chunks = [ch.choices[0] for ch in c.completions.create(model="two", prompt="rev abc=", max_tokens=8, stream=True,
                                                            extra_body={"guided_regex": r"[0-9]{2}-[a-c]"})
              if ch.choices]
    assert "".join(ch.text for ch in chunks) == want[1].text and chunks[-1].finish_reason == "stop"
    r = c.chat.completions.create(model="two", messages=[{"role": "user", "content": "add 1+2="}], max_tokens=8,
                                  extra_body={"structured_outputs": {"regex": "[a-c]{20}"}})  # past the stage's 16
    assert re.fullmatch("[a-c]{16}", r.choices[0].message.content) and r.choices[0].finish_reason == "length"
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"enum": ["x", "y"]}}, "required": ["n"]}}}
    r = c.chat.completions.create(model="two", messages=[{"role": "user", "content": "add 1+2="}], max_tokens=30,
                                  tools=[tool], tool_choice={"type": "function", "function": {"name": "pick"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "pick" and json.loads(call.function.arguments)["n"] in ("x", "y")


def test_a_stage_of_the_pipelines_file_has_its_own_structure(bundles, tmp_path, capsys):
    """``structured_outputs`` on a stage in the YAML: its answer follows it (a request's structure replaces it on
    the last stage); a bad one is refused when the file is read, naming the stage and the field."""
    from branchmerge.errors import ConfigError
    from branchmerge.staged import load_pipelines, run_pipeline
    from tests.cli_util import run_cli

    b = branchmerge.load(bundles[0.9])
    f = tmp_path / "pipes.yaml"
    f.write_text("pipelines:\n  - name: vote\n    stages:\n"
                 "      - {branch: a, user: '{question}', max_tokens: 6, structured_outputs: {choice: ['yes', 'no']}}\n"
                 "      - {branch: c, user: 'q {previous}', max_tokens: 6}\n")
    pipe = load_pipelines(f).get("vote")
    got = run_pipeline(b, pipe, ["rev abc=", "add 1+1=", "key zz="])
    assert all(r[0].text in ("yes", "no") for r in got)
    last = run_pipeline(b, pipe, ["rev abc="], structure=Structure.choices(["left", "right"]))[0]
    assert last[0].text in ("yes", "no") and last[1].text in ("left", "right")
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "rev abc=", "--pipelines", f, "--pipeline", "vote",
                             "--choice", "left", "--choice", "right")
    assert code == 0 and out.split() == [last[0].text, last[1].text], err
    for bad, needle in [("{regex: '[a-'}", "structured_outputs.regex is not a usable regular expression"),
                        ("{regex: a, choice: [b]}", "needs exactly one of"), ("{xml: a}", "not supported"),
                        ("regex", "valid dictionary"), ("{choice: [yes, no]}", "item 0 is true (YAML reads")]:
        f.write_text("pipelines:\n  - name: p\n    stages:\n"
                     f"      - {{branch: a, structured_outputs: {bad}}}\n")
        with pytest.raises(ConfigError, match="stages") as e:
            load_pipelines(f)
        assert needle in str(e.value) and str(f) in str(e.value), str(e.value)


def test_text_response_format_changes_nothing(server):
    c = server["client"]
    args = {"model": "a", "messages": [{"role": "user", "content": "rev abc="}], "max_tokens": 8}
    assert c.chat.completions.create(**args, response_format={"type": "text"}).choices[0].message.content == \
        c.chat.completions.create(**args).choices[0].message.content


def test_cli_generate_follows_a_structure(capsys, bundles, tmp_path):
    from tests.cli_util import run_cli

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "add 1+2=", "--branch", "a", "-n", "60",
                             "--json-schema", schema)
    assert code == 0, err
    _check(STRUCTURES[2], out.strip())
    code, out, err = run_cli(capsys, "generate", bundles[0.9], "add 1+2=", "--branch", "b", "--choice", "left",
                             "--choice", "right")
    assert code == 0 and out.strip() in ("left", "right"), err
    # bad input: named, before the bundle loads
    schema.write_text('{"type": "nope"}')
    for args, needle in [(["--json-schema", schema], "--json-schema is not a usable JSON schema"),
                         (["--regex", "[a-"], "--regex is not a usable regular expression"),
                         (["--regex", "a", "--choice", "b"], "give one of"),
                         (["--grammar", tmp_path / "missing.ebnf"], "is not a file")]:
        code, out, err = run_cli(capsys, "generate", bundles[0.9], "x", "--branch", "a", *args)
        assert code != 0 and needle in " ".join(err.split()) and not out, (args, err)


def test_a_grammar_that_compiles_too_long_gets_a_400_and_holds_nothing(server, monkeypatch):
    """Compiling runs on its own threads, within a time limit: a request whose pattern takes longer gets a
    400 ``structure_timeout``, and the server answers others meanwhile."""
    from branchmerge.runtime.structured import Structurer
    from branchmerge.server import api

    real = Structurer.compile

    def slow(self, structure):  # as a pattern that takes a second to compile against a large vocabulary
        time.sleep(1.0)
        return real(self, structure)

    monkeypatch.setattr(api, "COMPILE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(Structurer, "compile", slow)
    r = httpx.post(server["url"] + "/v1/completions", json={
        "model": "a", "prompt": "add 1+2=", "max_tokens": 5, "structured_outputs": {"regex": "[0-9]+x"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "structure_timeout", r.text
    assert "structured_outputs.regex" in r.json()["error"]["message"]
    ok = server["client"].completions.create(model="b", prompt="add 1+1=", max_tokens=3)
    assert ok.choices[0].text == server["bundle"].generate("add 1+1=", "b", max_new_tokens=3)[0]


def test_the_structure_wins_over_min_tokens_and_bad_words(loaded):
    """Where a row's other settings leave none of the tokens its grammar allows (its end of text before
    ``min_tokens``, a choice's letters banned), it draws among the grammar's tokens by the model's logits: the
    answer still follows the structure, instead of going on unconstrained from a token nothing allowed."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    ids = tok.encode("add 1+2=")
    no = Structure.choices(["no"])
    for st in (RowSettings(structure=no, min_tokens=5),
               RowSettings(structure=no, bad_words=((tok.convert_tokens_to_ids("o"),),)),
               RowSettings(structure=no, allowed_token_ids=(tok.convert_tokens_to_ids("x"),), temperature=1.0)):
        out = b.generate_ids([ids], ["a"], max_new_tokens=10, row_sampler=RowSampler([st]))[0]
        assert (out.text, out.finish_reason) == ("no", "stop"), st


def test_a_row_that_ignores_its_end_of_text_draws_only_stop_tokens_once_complete(loaded):
    """With ``ignore_eos`` the row goes on past its complete answer, drawing only its end of text (as in vLLM),
    so its text stays the answer instead of going on unconstrained."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    st = RowSettings(structure=Structure.choices(["ab"]), ignore_eos=True)
    out = b.generate_ids([tok.encode("add 1+2=")], ["a"], max_new_tokens=8, row_sampler=RowSampler([st]))[0]
    assert (out.text, out.finish_reason) == ("ab", "length")
    assert out.new_ids == tok.encode("ab") + [tok.eos_token_id] * 6
