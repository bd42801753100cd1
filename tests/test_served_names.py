"""Other names for served models (vLLM's --served-model-name): a client's hard-coded model name reaches
`auto`, a branch or a pipeline through every API (chat, completions, responses, messages, tokenize, batch),
and names that would shadow or miss a model are refused at start."""

import json

import anthropic
import httpx
import openai
import pytest

from branchmerge.errors import ConfigError
from branchmerge.server import create_app
from branchmerge.server.names import model_aliases
from tests.cli_util import run_cli
from tests.serving import routed_bundle, serving

PIPES = {"pipelines": [{"name": "two_step", "stages": [{"branch": "a", "user": "{question}", "max_tokens": 6},
                                                       {"branch": "b", "user": "{previous}=", "max_tokens": 4}]}]}
NAMES = ["gpt-4o", "claude-sonnet-4-5=auto", "reverser=b", "team/pipe:v1=two_step"]


@pytest.fixture(scope="module")
def routed(bundles, tmp_path_factory):
    d = tmp_path_factory.mktemp("names") / "bundle"
    app = create_app(routed_bundle(bundles[0.9], d, PIPES), max_batch=8, wait_ms=20, served_model_names=NAMES)
    with serving(app) as url:
        yield {"url": url, "dir": d, "client": openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)}


def _chat(client, model, text, **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=6, **kw)
    return r.choices[0].message.content, r.model_extra.get("branch"), r.model


def test_a_name_reaches_what_it_stands_for_through_every_api(routed):
    c, url = routed["client"], routed["url"]
    for text in ("rev hello=", "add 5+5="):  # a bare name is auto: routed by the question
        assert _chat(c, "gpt-4o", text) == _chat(c, "auto", text)
        assert _chat(c, "claude-sonnet-4-5", text) == _chat(c, "auto", text)
        assert (c.completions.create(model="gpt-4o", prompt=text, max_tokens=6).choices[0].text
                == c.completions.create(model="auto", prompt=text, max_tokens=6).choices[0].text)
    assert _chat(c, "reverser", "add 5+5=") == _chat(c, "b", "add 5+5=")
    assert _chat(c, "reverser", "add 5+5=")[1] == "b"
    assert _chat(c, "team/pipe:v1", "add 2+3=")[0] == _chat(c, "two_step", "add 2+3=")[0]
    # the Responses and Messages APIs, tokenize and count_tokens read the name too
    r = c.responses.create(model="reverser", input="rev abc=", max_output_tokens=6)
    assert r.output_text == _chat(c, "b", "rev abc=")[0]
    a = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    m = a.messages.create(model="gpt-4o", max_tokens=6, messages=[{"role": "user", "content": "rev abc="}])
    assert m.content[0].text == _chat(c, "auto", "rev abc=")[0]
    n = a.messages.count_tokens(model="reverser", messages=[{"role": "user", "content": "rev abc="}]).input_tokens
    assert n == a.messages.count_tokens(model="b", messages=[{"role": "user", "content": "rev abc="}]).input_tokens
    tok = httpx.post(url + "/tokenize", json={"model": "reverser", "prompt": "rev abc="}).json()
    assert tok["tokens"] == httpx.post(url + "/tokenize", json={"model": "b", "prompt": "rev abc="}).json()["tokens"]
    # /v1/models lists each name with what it stands for; an unknown name is still a 404
    models = {m.id: m for m in c.models.list().data}
    assert {"gpt-4o", "claude-sonnet-4-5", "reverser", "team/pipe:v1", "a", "b", "c", "auto"} <= set(models)
    assert models["reverser"].model_extra["root"] == "b" and models["gpt-4o"].model_extra["root"] == "auto"
    assert c.models.retrieve("team/pipe:v1").model_extra["root"] == "two_step"
    with pytest.raises(openai.NotFoundError, match="gpt-5"):
        _chat(c, "gpt-5", "rev abc=")


def test_names_that_shadow_or_miss_a_model_are_refused():
    ids = ["a", "b", "c", "two_step", "auto"]
    assert model_aliases(["x", "y=b", "y=b"], ids) == {"x": "auto", "y": "b"}
    assert model_aliases(["only"], ["a"]) == {"only": "a"}
    cases = [(["b=a"], "'b' is already a served model's name"), (["auto=a"], "already a served model's name"),
             (["x=zz"], "'zz' is not served"), (["x=a", "x=b"], "given for both 'a' and 'b'"),
             (["two words=a"], "without spaces"), (["=a"], "1 to 256 characters")]
    for entries, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            model_aliases(entries, ids)
    with pytest.raises(ConfigError, match="has no router, so a name alone cannot say which; give gpt=MODEL"):
        model_aliases(["gpt"], ["a", "b", "c"])


def test_serve_and_run_batch_take_the_names(bundles, tmp_path, capsys):
    # a bundle of three branches and no router: a bare name is refused at start, naming the fix
    code, _, err = run_cli(capsys, "serve", bundles[0.9], "--served-model-name", "gpt-4o", "--port", "0")
    assert code != 0 and "give gpt-4o=MODEL" in " ".join(err.split())
    lines = [{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "rev", "messages": [{"role": "user", "content": "rev abc="}], "max_tokens": 6}},
             {"custom_id": "2", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "b", "messages": [{"role": "user", "content": "rev abc="}], "max_tokens": 6}}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, _, err = run_cli(capsys, "run-batch", bundles[0.9], "-i", src, "-o", tmp_path / "out.jsonl",
                           "--served-model-name", "rev=b")
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    bodies = [r["response"]["body"] for r in recs]
    assert [r["response"]["status_code"] for r in recs] == [200, 200]
    assert bodies[0]["choices"][0]["message"]["content"] == bodies[1]["choices"][0]["message"]["content"]
