"""Breaking the server as an attacker or a careless client would: bounded work per request, fair turns,
cancelled work for clients that leave, no leaks in errors, the key guarding everything."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import branchmerge
from branchmerge.front import build_bundle_router, front_for
from branchmerge.router import RouterConfig
from branchmerge.server import OpenAIService, ServerLimits, create_app
from branchmerge.server import protocol as P
from branchmerge.server.api import ClientGone
from tests.conftest import save_char_tokenizer, write_config
from tests.serving import serving

KEY = "sk-safety"


@pytest.fixture(scope="module")
def bundle(bundles, tmp_path_factory):
    d = tmp_path_factory.mktemp("srv") / "bundle"
    shutil.copytree(bundles[0.9], d)
    b = branchmerge.load(d)
    build_bundle_router(b, RouterConfig(samples={"a": ["add 1+2="], "b": ["rev abc="], "c": ["key zz="]},
                                        template="{input} field of", phrase="field of"))
    return b


@pytest.fixture(scope="module")
def server(bundle):
    limits = ServerLimits(max_tokens=64, max_prompts=8, max_choices=16, max_prompt_chars=2000, max_body_bytes=64_000)
    app = create_app(bundle, api_key=KEY, limits=limits)
    with serving(app) as url:
        yield {"url": url, "app": app, "h": {"Authorization": f"Bearer {KEY}"}}


def _post(server, path, payload, **kw):
    return httpx.post(server["url"] + path, json=payload, headers=server["h"], timeout=60, **kw)


def test_key_guards_everything_but_a_bare_health(server):
    url = server["url"]
    for path in ("/docs", "/openapi.json", "/redoc", "/v1/models"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # nothing about the bundle
    full = httpx.get(url + "/health", headers=server["h"]).json()
    assert full["branches"] == ["a", "b", "c"] and full["queued"] == 0
    assert httpx.get(url + "/openapi.json", headers=server["h"]).status_code == 404  # docs off with a key
    r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
    assert r.status_code == 401


def test_limits_per_request(server, bundle, monkeypatch):
    # a huge prompt to the router is refused before any model work
    monkeypatch.setattr(bundle.router, "route", lambda *_: pytest.fail("routed a prompt past the limit"))
    r = _post(server, "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at most 2000" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": "a", "prompt": ["add 1=" for _ in range(1500)], "n": 16})
    assert r.status_code == 400 and "1500 prompts in one request" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": "a", "prompt": ["add 1="] * 4, "n": 5})
    assert r.status_code == 400 and "4 prompts × n=5 is 20 completions" in r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/v1/completions", content=b"{" + b" " * 100_000 + b"}",
                   headers={**server["h"], "Content-Type": "application/json"})
    assert r.status_code == 413 and "64000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the body arrives chunked and is counted as it comes
        yield b'{"model": "a", "prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(server["url"] + "/v1/completions", content=chunks(),
                   headers={**server["h"], "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_odd_values_get_clear_400s(server, bundle):
    greedy = bundle.generate("add 1+2=", "a", max_new_tokens=4)[0]
    r = _post(server, "/v1/completions", {"model": "a", "prompt": "add 1+2=", "max_tokens": 4, "temperature": 1e-45})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    raw = b'{"model": "a", "messages": [{"role": "user", "content": "ab\\ud800"}]}'
    r = httpx.post(server["url"] + "/v1/chat/completions", content=raw,
                   headers={**server["h"], "Content-Type": "application/json"})
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]
    for part in ({"type": "text", "text": 5}, {"type": "image_url", "image_url": {"url": "x"}}):
        r = _post(server, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": [part]}]})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["param"].startswith("messages.0.content")


def test_the_openai_sdk_hears_which_field_is_not_supported(server):
    """A field the server would not apply is a 400 naming it, through the real SDK; the gateway in front
    of vLLM forwards the same field (vLLM does apply it)."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "add 1+2="}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=msgs, max_tokens=2, extra_body={"length_penalty": 0.5})
    assert e.value.body["param"] == "length_penalty" and "is not supported" in e.value.body["message"]
    ok = client.chat.completions.create(model="a", messages=msgs, max_tokens=2, presence_penalty=0, seed=3,
                                        extra_body={"length_penalty": 1})
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_internal_errors_do_not_leak(server, bundle, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret /home/alice/weights")

    monkeypatch.setattr(bundle, "generate_ids", boom)
    r = _post(server, "/v1/completions", {"model": "a", "prompt": "add 1+2=", "max_tokens": 2})
    body = r.json()
    assert r.status_code == 500 and "secret" not in r.text and "error id" in body["error"]["message"]
    assert body["error"]["type"] == "server_error"


# ---- engine behaviour through the API surface, without HTTP ------------------------------------------
class _Slow:
    """Counts forward passes of a group's model and makes each take ``delay`` seconds."""

    def __init__(self, model, delay: float) -> None:
        import time

        self.calls = 0

        def hook(*_):
            self.calls += 1
            time.sleep(delay)

        self.handle = model.register_forward_pre_hook(hook)


def test_a_dropped_stream_stops_its_generation(bundle):
    svc = OpenAIService(front_for(bundle), limits=ServerLimits(max_tokens=100))
    slow = _Slow(bundle.groups["main"].model, 0.02)
    try:
        async def go():
            req = P.CompletionRequest(model="a", prompt="add 1+2=", max_tokens=100, stream=True)
            reply = await svc.completions(req)
            got = [await reply.stream.__anext__() for _ in range(3)]  # the role chunk, then tokens
            await reply.stream.aclose()  # what Starlette does when the client goes away
            return got

        first = asyncio.run(go())
        assert all(c.startswith("data: ") for c in first)
        end = asyncio.run(asyncio.sleep(0.5))  # let the engine notice
        assert end is None and svc.engine.queued() == 0
        assert slow.calls < 40, slow.calls  # not the 100 steps it asked for
    finally:
        slow.handle.remove()


def test_a_client_that_leaves_cancels_its_jobs(bundle):
    svc = OpenAIService(front_for(bundle), limits=ServerLimits(max_tokens=100))
    slow = _Slow(bundle.groups["main"].model, 0.02)
    try:
        async def go():
            checks = 0

            async def gone() -> bool:
                nonlocal checks
                checks += 1
                return checks > 1

            req = P.CompletionRequest(model="a", prompt=["add 1+2=", "rev ab="], max_tokens=100)
            with pytest.raises(ClientGone):
                await svc.completions(req, gone)
            await asyncio.sleep(0.5)

        asyncio.run(go())
        assert slow.calls < 60, slow.calls
    finally:
        slow.handle.remove()


def test_a_small_request_is_not_starved_by_a_big_one(bundle):
    """With two rows a batch, a 10-prompt request and a later 1-prompt request take turns: the small one
    is answered in the first batch, not after the five batches of the big one."""
    svc = OpenAIService(front_for(bundle), max_batch=2)
    done: list[str] = []

    async def go():
        async def call(name, prompts):
            await svc.completions(P.CompletionRequest(model="a", prompt=prompts, max_tokens=3))
            done.append(name)

        with svc.engine.paused():
            big = asyncio.create_task(call("big", [f"add {i}+1=" for i in range(10)]))
            await asyncio.sleep(0)
            while svc.engine.queued() < 10:
                await asyncio.sleep(0.01)
            small = asyncio.create_task(call("small", ["rev abc="]))
            while svc.engine.queued() < 11:
                await asyncio.sleep(0.01)
            before = svc.engine.batches
        await asyncio.gather(big, small)
        return svc.engine.batches - before

    batches = asyncio.run(go())
    assert done == ["small", "big"] and batches == 6  # 11 rows, 2 a batch


def test_queue_limit_answers_busy(bundle):
    svc = OpenAIService(front_for(bundle), limits=ServerLimits(max_queued=3))

    async def go():
        with svc.engine.paused():
            with pytest.raises(P.APIError) as e:
                await svc.completions(P.CompletionRequest(model="a", prompt=["add 1="] * 4, max_tokens=2))
        return e.value

    err = asyncio.run(go())
    assert err.status == 503 and err.code == "server_busy" and svc.engine.queued() == 0


def test_requests_that_fit_alone_are_not_padded_past_the_context(tmp_path):
    """GPT-2 has learned positions (n_positions=64). A 50-token prompt with 10 new tokens and a 5-token one
    with 55 each fit; padded into one batch (55 + 55 > 64) they would not, so they run apart."""
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64, bos_token_id=1,
                                   eos_token_id=2)).eval()
    m.save_pretrained(tmp_path / "g")
    save_char_tokenizer(tmp_path / "g")
    from branchmerge.config import load_config
    from branchmerge.merge import run_merge

    run_merge(load_config(write_config(tmp_path / "c.yaml", [{"name": "g", "model": str(tmp_path / "g")}])),
              tmp_path / "b", progress=False)
    b = branchmerge.load(tmp_path / "b", dtype="float32")
    svc = OpenAIService(front_for(b), max_batch=8)
    long_p, short_p = "ab" * 25, "abcde"
    want = [b.generate(long_p, "g", max_new_tokens=10)[0], b.generate(short_p, "g", max_new_tokens=55)[0]]

    async def go():
        with svc.engine.paused():
            tasks = [asyncio.create_task(svc.completions(P.CompletionRequest(model="g", prompt=p, max_tokens=mt)))
                     for p, mt in ((long_p, 10), (short_p, 55))]
            while svc.engine.queued() < 2:
                await asyncio.sleep(0.01)
        return [(await t).body["choices"][0]["text"] for t in tasks]

    assert asyncio.run(go()) == want
    assert svc.engine.batches == 2


def test_serve_command_answers_and_stops_on_sigterm(bundles, tmp_path):
    """`branchmerge serve` as a user runs it: answers with the key, and SIGTERM ends it promptly even with
    a stream open."""
    import signal
    import subprocess
    import sys
    import time

    from tests.serving import free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "branchmerge.cli.main", "serve", str(bundles[0.9]), "--port", str(port),
                          "--api-key", KEY], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert p.poll() is None and time.monotonic() < end, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        h = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(url + "/v1/completions", headers=h, json={"model": "b", "prompt": "rev abc=", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["branch"] == "b"
        with httpx.stream("POST", url + "/v1/completions", headers=h, timeout=30,
                          json={"model": "b", "prompt": "rev abc=", "max_tokens": 100, "stream": True}) as s:
            next(s.iter_lines())
            p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        assert p.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
        said = p.stdout.read()  # what it serves, and where, before it starts
        assert f"serving 3 models at http://127.0.0.1:{port}/v1: a, b, c" in said, said
        assert "POST /v1/chat/completions" in said and "POST /v1/responses" in said and "POST /v1/messages" in said
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_exposed_host_without_key_warns(caplog):
    from branchmerge.server.app import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("0.0.0.0", "k") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)


def test_hot_switch_waits_for_the_running_batch(bundle):
    """materialize() from another thread while the engine runs a batch waits for that batch: the batch
    sees one consistent set of weights, and afterwards the branch is hot."""
    import threading
    import time

    from branchmerge.runtime.modules import BranchedLinear

    svc = OpenAIService(front_for(bundle))
    want = bundle.generate("add 1+2=", "a", max_new_tokens=6)[0]
    slow = _Slow(bundle.groups["main"].model, 0.05)  # counts the batch's forward passes from here
    seen: list[int] = []  # forward passes done when the first layer turned hot
    orig = BranchedLinear.materialize

    def spy(self, i):
        if not seen:
            seen.append(slow.calls)
        return orig(self, i)

    BranchedLinear.materialize = spy
    try:
        async def go():
            task = asyncio.create_task(svc.completions(P.CompletionRequest(model="a", prompt="add 1+2=",
                                                                           max_tokens=6)))
            while slow.calls == 0:
                await asyncio.sleep(0.01)
            done = threading.Event()
            t0 = time.monotonic()
            th = threading.Thread(target=lambda: (bundle.materialize("a"), done.set()))
            th.start()
            reply = await task
            await asyncio.get_running_loop().run_in_executor(None, th.join)
            return reply.body["choices"][0]["text"], done.is_set(), time.monotonic() - t0

        text, hot, _ = asyncio.run(go())
        assert text == want and hot and "a" in bundle._hot
        assert seen == [slow.calls] and slow.calls >= 6  # no forward pass of the batch after the switch began
    finally:
        BranchedLinear.materialize = orig
        slow.handle.remove()
        bundle.dematerialize("a")


def test_a_client_that_hangs_up_over_http_withdraws_its_job(bundles):
    """Over a real socket: the request waits (engine paused), the client times out and closes its
    connection, and the server withdraws the job before it ever runs. (Starlette's http middleware hid
    the disconnect; the guard is a plain ASGI middleware so that it is seen.)"""
    import threading
    import time

    from tests.serving import wait_queued

    app = create_app(branchmerge.load(bundles[0.9]), max_batch=4, wait_ms=1)
    engine = app.state.engine
    with serving(app) as url, engine.paused():
        gave_up = []

        def client():
            try:
                httpx.post(url + "/v1/chat/completions", timeout=1.5,
                           json={"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            except httpx.TimeoutException:
                gave_up.append(True)

        th = threading.Thread(target=client)
        th.start()
        wait_queued(engine, 1)
        th.join(timeout=30)
        end = time.monotonic() + 10
        while engine.queued() and time.monotonic() < end:
            time.sleep(0.05)
        assert gave_up and engine.queued() == 0
