"""The gateway against real upstreams: two `branchmerge serve` processes on loopback, the gateway on a
third port, the real `openai` SDK as the client; one upstream killed mid-test."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import branchmerge
from branchmerge.errors import ConfigError
from branchmerge.front import build_bundle_router
from branchmerge.router import RouterConfig
from branchmerge.server.app import build_app
from branchmerge.server.gateway import GatewayService, load_gateway_config
from tests.serving import free_port, serving, stop_process

PIPES = {"pipelines": [{"name": "cross", "stages": [
    {"branch": "c", "user": "{question}", "max_tokens": 5},
    {"branch": "a", "user": "{previous}=", "max_tokens": 4},
]}, {"name": "first", "stages": [{"branch": "b", "user": "{question}", "max_tokens": 6, "extract": "[0-9a-z]"}]}]}


def _start(bundle, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "branchmerge.cli.main", "serve", str(bundle), "--port", str(port),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _wait(proc: subprocess.Popen, port: int) -> None:
    end = time.monotonic() + 180
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("upstream did not start")


@pytest.fixture(scope="module")
def gw(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("gw")
    d = root / "bundle"
    shutil.copytree(bundles[0.9], d)
    samples = {"a": ["add 1+2=", "add 5+5="], "b": ["rev abc=", "rev hello="], "c": ["key zz=", "key ab="]}
    build_bundle_router(branchmerge.load(d), RouterConfig(samples=samples, template="{input} field of",
                                                          phrase="field of"))
    (root / "pipes.yaml").write_text(yaml.safe_dump(PIPES))
    p1, p2 = free_port(), free_port()
    procs = [_start(d, p1, "--max-tokens-limit", "16"), _start(d, p2)]
    try:
        for proc, port in zip(procs, (p1, p2)):
            _wait(proc, port)
        cfg = {"upstreams": {"u1": {"base_url": f"http://127.0.0.1:{p1}/v1", "max_concurrency": 4},
                             "u2": {"base_url": f"http://127.0.0.1:{p2}/v1", "timeout_s": 60},
                             "slow": {"base_url": f"http://127.0.0.1:{p2}/v1", "timeout_s": 1e-6},
                             "small": {"base_url": f"http://127.0.0.1:{p1}/v1", "max_response_bytes": 1024}},
               "branches": {"a": {"upstream": "u1"}, "b": {"upstream": "u1"}, "c": {"upstream": "u2"},
                            "b-slow": {"upstream": "slow", "model": "b"},
                            "a-small": {"upstream": "small", "model": "a"},
                            "a-alias": {"upstream": "u2", "model": "a"}},
               "router": "bundle", "pipelines": "pipes.yaml"}
        (root / "gateway.yaml").write_text(yaml.safe_dump(cfg))
        service = GatewayService.from_config(load_gateway_config(root / "gateway.yaml"))
        with serving(build_app(service)) as url:
            yield {"url": url, "procs": procs, "bundle": d, "p1": p1, "p2": p2,
                   "client": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60),
                   "direct": openai.OpenAI(base_url=f"http://127.0.0.1:{p1}/v1", api_key="none", max_retries=0)}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


def test_models_and_health(gw):
    assert {m.id for m in gw["client"].models.list().data} == {"a", "b", "c", "b-slow", "a-small", "a-alias", "cross",
                                                                  "first", "auto"}
    h = httpx.get(gw["url"] + "/health").json()
    assert h["status"] == "ok" and h["upstreams"]["u1"]["ok"]
    assert sorted(h["upstreams"]["u2"]["branches"]) == ["a-alias", "c"]


def test_answers_equal_the_upstreams_and_auto_routes(gw):
    c, direct = gw["client"], gw["direct"]
    msgs = [{"role": "user", "content": "rev abc="}]
    via = c.chat.completions.create(model="b", messages=msgs, max_tokens=8)
    want = direct.chat.completions.create(model="b", messages=msgs, max_tokens=8)
    assert via.choices[0].message.content == want.choices[0].message.content and via.model_extra["branch"] == "b"
    r = c.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "rev hello="}],
                                                    max_tokens=4)
    assert r.headers["x-branchmerge-branch"] == "b" and r.parse().model_extra["branch"] == "b"
    t = c.completions.create(model="a", prompt="add 2+3=", max_tokens=6)
    assert t.choices[0].text == direct.completions.create(model="a", prompt="add 2+3=", max_tokens=6).choices[0].text
    two = c.completions.create(model="auto", prompt=["rev hello=", "key zz="], max_tokens=4)
    assert [ch.model_extra["branch"] for ch in two.choices] == ["b", "c"]


def test_tokenize_and_detokenize_pass_to_the_branchs_upstream(gw):
    """vLLM's /tokenize and /detokenize go to the branch's upstream (at its root, under its model name), auto
    routed on the text; pipelines, auto detokenize and an upstream past its time limit are named errors."""
    url, direct = gw["url"], f"http://127.0.0.1:{gw['p2']}"
    want = httpx.post(direct + "/tokenize", json={"model": "a", "prompt": "add 2+3=", "return_token_strs": True}).json()
    via = httpx.post(url + "/tokenize", json={"model": "a-alias", "prompt": "add 2+3=", "return_token_strs": True})
    assert via.status_code == 200 and via.json()["tokens"] == want["tokens"] and via.json()["branch"] == "a-alias"
    assert via.json()["token_strs"] == want["token_strs"] and len(want["tokens"]) >= 8
    auto = httpx.post(url + "/tokenize", json={"model": "auto", "messages": [{"role": "user", "content": "rev hello="}]})
    assert auto.json()["branch"] == "b" and auto.json()["count"] == len(auto.json()["tokens"]) > 0
    back = httpx.post(url + "/detokenize", json={"model": "a", "tokens": want["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == httpx.post(
        direct + "/detokenize", json={"model": "a", "tokens": want["tokens"]}).json()["prompt"]
    for path, body, status, needle in (
            ("/tokenize", {"model": "cross", "prompt": "x"}, 400, "pipeline 'cross'"),
            ("/detokenize", {"model": "auto", "tokens": [1]}, 400, "needs a branch"),
            ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "'nope' does not exist"),
            ("/tokenize", {"model": "b-slow", "prompt": "x"}, 504, "slow"),
            ("/tokenize", {"model": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "one of")):
        r = httpx.post(url + path, json=body)
        assert r.status_code == status and needle in r.json()["error"]["message"], (path, body, r.text)


def test_streaming_passes_through(gw):
    c = gw["client"]
    msgs = [{"role": "user", "content": "add 2+3="}]
    full = c.chat.completions.create(model="c", messages=msgs, max_tokens=10)
    chunks = list(c.chat.completions.create(model="c", messages=msgs, max_tokens=10, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # each event names the model the client asked for and the branch, not the upstream's own model name
    chunks = list(c.completions.create(model="a-alias", prompt="add 1+1=", max_tokens=3, stream=True))
    assert chunks and all(ch.model == "a-alias" and ch.model_extra["branch"] == "a-alias" for ch in chunks)
    chunks = list(c.completions.create(model="auto", prompt="rev hello=", max_tokens=3, stream=True))
    assert chunks and all(ch.model == "auto" and ch.model_extra["branch"] == "b" for ch in chunks)


def test_responses_api_through_the_gateway(gw):
    """/v1/responses on the gateway: the branch's upstream answers it as chat (auto routed), streamed too,
    and previous_response_id continues from the gateway's own store."""
    c, direct = gw["client"], gw["direct"]
    r = c.responses.create(model="auto", input="rev hello=", max_output_tokens=6, temperature=0)
    want = direct.chat.completions.create(model="b", messages=[{"role": "user", "content": "rev hello="}],
                                          max_tokens=6, temperature=0)
    assert r.output_text == want.choices[0].message.content and r.model_extra["branch"] == "b"
    events = list(c.responses.create(model="c", input="add 2+3=", max_output_tokens=6, temperature=0, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type in ("response.completed", "response.incomplete") and deltas == events[-1].response.output_text
    nxt = c.responses.create(model="b", input="dup a=", previous_response_id=r.id, max_output_tokens=4, temperature=0)
    want = direct.chat.completions.create(model="b", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "rev hello="}, {"role": "assistant", "content": r.output_text},
        {"role": "user", "content": "dup a="}])
    assert nxt.output_text == want.choices[0].message.content


def test_messages_api_through_the_gateway(gw):
    """/v1/messages and count_tokens on the gateway: the branch's upstream answers (auto routed)."""
    import anthropic

    c = anthropic.Anthropic(base_url=gw["url"], api_key="none", max_retries=0, timeout=60)
    ask = [{"role": "user", "content": "rev hello="}]
    m = c.messages.create(model="auto", max_tokens=6, messages=ask, extra_body={"temperature": 0})
    want = gw["direct"].chat.completions.create(model="b", messages=ask, max_tokens=6, temperature=0)
    assert m.content[0].text == want.choices[0].message.content and m.model_extra["branch"] == "b"
    direct = httpx.post(f"http://127.0.0.1:{gw['p1']}/tokenize", json={"model": "b", "messages": ask}).json()
    assert c.messages.count_tokens(model="b", messages=ask).input_tokens == direct["count"]


def test_pipeline_runs_across_upstreams(gw):
    p = gw["client"].chat.completions.create(model="cross", messages=[{"role": "user", "content": "key zz="}])
    stages = p.model_extra["stages"]
    assert [s["branch"] for s in stages] == ["c", "a"] and p.choices[0].message.content == stages[-1]["text"]
    first = gw["client"].chat.completions.create(model="c", messages=[{"role": "user", "content": "key zz="}],
                                                 max_tokens=5, temperature=0.0)
    assert stages[0]["text"] == first.choices[0].message.content.strip()


def test_a_pipeline_streams_its_last_stage_through_the_gateway(gw):
    """Streamed, a pipeline's last stage comes as its upstream writes it, in chat and completions form, named
    as the client asked; the text and the usage equal the unstreamed answer's."""
    c = gw["client"]
    whole = c.chat.completions.create(model="cross", messages=[{"role": "user", "content": "key zz="}])
    chunks = list(c.chat.completions.create(model="cross", messages=[{"role": "user", "content": "key zz="}],
                                            stream=True, stream_options={"include_usage": True}))
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(texts) == whole.choices[0].message.content and len(texts) >= 2
    assert all(ch.model == "cross" and ch.model_extra["branch"] == "a" for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    done = c.completions.create(model="cross", prompt="key zz=")
    parts = list(c.completions.create(model="cross", prompt="key zz=", stream=True))
    assert all(p.choices for p in parts)  # (no usage event: not asked for)
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text
    assert all(p.object == "text_completion" for p in parts) and parts[-1].choices[0].finish_reason is not None
    # a last stage with `extract`: its answer as one chunk, after the whole output
    one = c.chat.completions.create(model="first", messages=[{"role": "user", "content": "rev abc="}])
    got = list(c.chat.completions.create(model="first", messages=[{"role": "user", "content": "rev abc="}],
                                         stream=True, stream_options={"include_usage": True}))
    assert [ch.choices[0].delta.content for ch in got if ch.choices and ch.choices[0].delta.content] == \
        [one.choices[0].message.content] and len(one.choices[0].message.content) == 1
    assert got[-1].usage.model_dump() == one.usage.model_dump()


def test_a_pipeline_through_the_gateway_formats_its_last_stage(gw):
    """The request's structure goes with the pipeline's last stage to its upstream (that upstream's own answer to
    that stage's prompt); earlier stages answer freely; a bad structure or tools are refused before any stage."""
    c, direct = gw["client"], gw["direct"]
    so = {"structured_outputs": {"regex": "[0-9]{3}"}}
    p = c.chat.completions.create(model="cross", messages=[{"role": "user", "content": "key zz="}], extra_body=so)
    stages = p.model_extra["stages"]
    free = c.chat.completions.create(model="cross", messages=[{"role": "user", "content": "key zz="}])
    assert stages[0] == free.model_extra["stages"][0] and stages[-1]["text"] != free.model_extra["stages"][-1]["text"]
    want = direct.chat.completions.create(model="a", messages=[{"role": "user", "content": stages[0]["text"] + "="}],
                                          max_tokens=4, temperature=0.0, extra_body=so).choices[0]
    assert p.choices[0].message.content == stages[-1]["text"] == want.message.content
    assert re.fullmatch("[0-9]{3}", want.message.content) and p.choices[0].finish_reason == want.finish_reason
    cut = c.chat.completions.create(model="cross", messages=[{"role": "user", "content": "key zz="}],
                                    extra_body={"guided_regex": "[a-c]{9}"})  # more than the stage's 4 tokens
    assert re.fullmatch("[a-c]{4}", cut.choices[0].message.content) and cut.choices[0].finish_reason == "length"
    for extra, param in [({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                          "tools")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="cross", messages=[{"role": "user", "content": "key zz="}],
                                      extra_body=extra)
        assert e.value.body["param"] == param, e.value.body


def test_upstream_errors_and_timeouts_name_the_upstream(gw):
    c = gw["client"]
    with pytest.raises(openai.BadRequestError) as e:  # u1 takes max_tokens ≤ 16; the gateway passes 32 on
        c.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=32)
    assert "upstream 'u1'" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="b-slow", messages=[{"role": "user", "content": "rev abc="}], max_tokens=16)
    assert e.value.status_code == 504 and "upstream 'slow'" in e.value.message and "did not answer" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:  # a bigger answer than the upstream may send
        c.completions.create(model="a-small", prompt="add 1+1=", max_tokens=4, n=16)
    assert e.value.status_code == 502 and "larger than its limit of 1024 bytes" in e.value.message
    assert c.completions.create(model="a-small", prompt="add 1+1=", max_tokens=2).choices
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="a", prompt=[1, 2, 3], max_tokens=2)  # token ids mean nothing across upstreams


def test_a_killed_upstream_fails_alone(gw):
    """Last in the module: kills u2."""
    c = gw["client"]
    gw["procs"][1].kill()
    gw["procs"][1].wait(timeout=30)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="c", messages=[{"role": "user", "content": "key zz="}], max_tokens=4)
    assert e.value.status_code == 502 and "upstream 'u2'" in e.value.message
    ok = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "add 1+1="}], max_tokens=4)
    assert ok.model_extra["branch"] == "a"
    h = httpx.get(gw["url"] + "/health").json()
    assert h["status"] == "degraded" and not h["upstreams"]["u2"]["ok"] and h["upstreams"]["u1"]["ok"]


def test_gateway_config_errors(tmp_path):
    bad = {"upstreams": {"u": {"base_url": "ftp://x"}}, "branches": {"a": {"upstream": "u"}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="base_url must be an http"):
        load_gateway_config(tmp_path / "g.yaml")
    bad = {"upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}}, "branches": {"a": {"upstream": "v"}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="branches.a.upstream"):
        load_gateway_config(tmp_path / "g.yaml")
    bad["branches"] = {"../x": {"upstream": "u"}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError):
        load_gateway_config(tmp_path / "g.yaml")



def test_a_client_that_goes_away_stops_the_upstream_work(bundles, tmp_path):
    """A non-streamed request whose client gives up: the gateway cancels its upstream call, the upstream
    (a real server on loopback, its engine paused so the job waits) sees the disconnect and withdraws
    the job, and the gateway frees the upstream's slot."""
    from branchmerge.server import create_app
    from tests.serving import wait_queued

    up = create_app(branchmerge.load(bundles[0.9]), max_batch=4, wait_ms=1)
    engine = up.state.engine
    with serving(up) as up_url:
        cfg = {"upstreams": {"u": {"base_url": up_url + "/v1"}}, "branches": {"a": {"upstream": "u"}}}
        (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
        service = GatewayService.from_config(load_gateway_config(tmp_path / "g.yaml"))
        with serving(build_app(service)) as url, engine.paused():
            body = {"model": "a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
            gave_up = []

            def client():
                try:
                    httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(2.0, connect=5))
                except httpx.TimeoutException:
                    gave_up.append(True)

            th = threading.Thread(target=client)
            th.start()
            wait_queued(engine, 1)  # the job waits at the upstream (its engine is paused)
            assert service.up["u"].in_flight == 1
            th.join(timeout=30)
            assert gave_up
            end = time.monotonic() + 15
            while (engine.queued() or service.up["u"].in_flight) and time.monotonic() < end:
                time.sleep(0.05)
            # withdrawn at the upstream while its engine was still paused: its client (the gateway) went away
            assert service.up["u"].in_flight == 0, "gateway kept its upstream call"
            assert engine.queued() == 0
            r = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": ["x"] * 40, "n": 4, "max_tokens": 1})
            assert r.status_code == 400 and "choices per request" in r.json()["error"]["message"]


def _misbehaving_upstream():
    """A real HTTP server on loopback that answers each model name wrongly in its own way."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        model = (await req.json())["model"]

        async def drip():  # a byte now and then, never a whole answer or a whole event
            while True:
                yield b" "
                await asyncio.sleep(0.1)

        async def endless_line():
            while True:
                yield b"x" * (1 << 16)
                await asyncio.sleep(0)

        async def slow_events():  # whole events, each within the timeout: allowed however long it runs
            for k in range(4):
                await asyncio.sleep(0.4)
                yield f'data: {{"k": {k}}}\r\n\r\n'.encode()
            yield b"data: [DONE]\n\n"

        streams = {"drip": drip, "endless": endless_line, "slow": slow_events}
        if model in streams:
            return StreamingResponse(streams[model](), media_type="text/event-stream")
        if model == "no-choices":
            return JSONResponse({"id": "x", "object": "chat.completion"})
        content = {"bad-content": 5, "wordy": "the quick brown fox jumps over the lazy dog " * 3}.get(model, "fine")
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                          "finish_reason": "stop"}], "usage": "lots"})

    return app


def test_a_misbehaving_upstream_is_cut_off_and_named(tmp_path):
    """An upstream that drips bytes, sends an endless line, or answers with the wrong shape: each is a 502 or
    504 naming it (or an error event, in a stream), within its timeout and byte limit, never a hang or a 500."""
    names = ["drip", "endless", "slow", "no-choices", "bad-content", "fine", "wordy"]
    with serving(_misbehaving_upstream()) as up:
        cfg = {"upstreams": {"u": {"base_url": up + "/v1", "timeout_s": 0.8, "max_response_bytes": 1 << 20}},
               "branches": {n: {"upstream": "u"} for n in names}, "pipelines": "p.yaml"}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"pipelines": [
            *({"name": f"via-{n}", "stages": [{"branch": n, "user": "{question}"}]} for n in names),
            {"name": "runaway", "stages": [{"branch": "wordy", "extract": r"(?:(\w)|.)*\p{Han}"}]}]}))
        (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
        service = GatewayService.from_config(load_gateway_config(tmp_path / "g.yaml"))
        with serving(build_app(service)) as url:
            def post(model: str, **kw):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}
                t = time.monotonic()
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
                return r, time.monotonic() - t

            r, took = post("drip")  # the whole answer is bounded by timeout_s, not each byte
            assert r.status_code == 504 and "upstream 'u'" in r.json()["error"]["message"] and took < 5
            for model in ("no-choices", "via-no-choices", "via-bad-content"):
                r, _ = post(model)
                assert r.status_code == 502, (model, r.text)
                assert r.json()["error"]["code"] == "upstream_bad_response" and "upstream 'u'" in r.text
            with ThreadPoolExecutor(1) as ex:  # a runaway extract regex: stopped, and off the event loop
                slow = ex.submit(post, "runaway")
                time.sleep(0.3)
                t = time.monotonic()
                assert httpx.get(url + "/health", timeout=5).status_code == 200 and time.monotonic() - t < 0.5
                r, took = slow.result()
            assert r.status_code == 500 and r.json()["error"]["code"] == "extract_timeout" and took < 10
            r, _ = post("via-fine")  # an unreadable `usage` counts nothing, the answer stands
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
            assert r.json()["usage"]["completion_tokens"] == 0

            def stream(model: str) -> tuple[list[str], float]:
                body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                t = time.monotonic()
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                    assert r.status_code == 200
                    return [ln for ln in r.iter_lines() if ln.strip()], time.monotonic() - t

            for model, code in (("drip", "upstream_timeout"), ("endless", "upstream_response_too_large")):
                events, took = stream(model)
                assert len(events) == 2 and events[-1] == "data: [DONE]" and took < 5, (model, events[:1])
                assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == code
            events, took = stream("slow")  # 1.6 s in all, but each event within 0.8 s of the one before
            assert events == [*(f'data: {{"k": {k}}}' for k in range(4)), "data: [DONE]"] and took > 1.2
        assert service.up["u"].in_flight == 0


def test_the_gateway_command_serves_https(gw, tmp_path):
    """`branchmerge gateway` as an operator runs it with --ssl-keyfile/--ssl-certfile: the openai SDK trusting the
    certificate gets the upstream's answer over HTTPS."""
    from tests.test_serve_options import _certificate

    key, cert = _certificate(tmp_path)
    cfg = {"upstreams": {"u1": {"base_url": f"http://127.0.0.1:{gw['p1']}/v1"}}, "branches": {"b": {"upstream": "u1"}}}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "branchmerge.cli.main", "gateway", str(tmp_path / "gateway.yaml"),
                          "--port", str(port), "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            assert p.poll() is None and time.monotonic() < end, p.stderr.read().decode()[-2000:]
            try:
                httpx.get(url + "/health", verify=str(cert), timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60,
                          http_client=httpx.Client(verify=str(cert)))
        msgs = [{"role": "user", "content": "rev abc="}]
        via = c.chat.completions.create(model="b", messages=msgs, max_tokens=6)
        want = gw["direct"].chat.completions.create(model="b", messages=msgs, max_tokens=6)
        assert via.choices[0].message.content == want.choices[0].message.content
    finally:
        stop_process(p)
