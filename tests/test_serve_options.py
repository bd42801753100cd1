"""vLLM's serving options an operator reaches for: ``--max-model-len`` (tokens per request at most, on every
branch), HTTPS (``--ssl-keyfile``/``--ssl-certfile``) and ``--enable-auto-tool-choice`` (accepted with a
parser, as vLLM needs both); each bad value refused by name before the bundle loads."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

import branchmerge
from branchmerge.runtime.bundle import ContextLengthError
from branchmerge.server import create_app
from tests.cli_util import run_cli
from tests.serving import free_port, serving, stop_process, wait_listening


def test_max_model_len_bounds_every_branch(bundles):
    """At 40 tokens: each branch's context is 40 (its config says 128), a prompt and max_tokens past it are
    refused naming 40, a default max_tokens is cut to what is left, /v1/models says 40."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    assert b.context_limit("a") == 128
    b.max_model_len = 40
    assert b.context_limit("a") == 40 and b.tightest_context("abc") == 40
    with pytest.raises(ContextLengthError, match="exceeds the 40-token context of branch 'a'"):
        b.check_context("a", 30, 11)
    ids, names, mt = b.prepare(["rev " + "ab" * 15 + "="], "a", chat=False)
    assert mt == 40 - len(ids[0])
    for bad in (1, 0, True, 2.5, "40"):
        with pytest.raises(ValueError, match="max_model_len must be an integer of at least 2"):
            b.max_model_len = bad
    with serving(create_app(b, max_batch=4, wait_ms=5)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert {m.id: m.model_extra.get("max_model_len") for m in c.models.list().data}["a"] == 40
        prompt = "rev " + "ab" * 15 + "="  # 35 characters, a token each
        with pytest.raises(openai.BadRequestError, match="40-token context"):
            c.completions.create(model="a", prompt=prompt, max_tokens=8)
        out = c.completions.create(model="a", prompt=prompt, temperature=0)
        assert out.usage.prompt_tokens + out.usage.completion_tokens <= 40
    b.max_model_len = None
    assert b.context_limit("a") == 128


def _certificate(folder) -> tuple:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_serve_over_https_with_the_options(bundles, tmp_path):
    """`branchmerge serve` as an operator runs it, over HTTPS: the openai SDK trusting the certificate gets the
    models (max_model_len 100), a chat rendered with --chat-template chatml within 100 tokens (its default
    max_tokens cut to fit), with --enable-auto-tool-choice accepted beside --tool-call-parser; plain HTTP gets
    no answer."""
    key, cert = _certificate(tmp_path)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "branchmerge.cli.main", "serve", str(bundles[0.9]), "--port", str(port),
                          "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--max-model-len", "100",
                          "--chat-template", "chatml", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert p.poll() is None and time.monotonic() < end, p.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", verify=str(cert), timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60,
                          http_client=httpx.Client(verify=str(cert)))
        assert {m.model_extra.get("max_model_len") for m in c.models.list().data} == {100}
        tokens = httpx.post(url + "/tokenize", verify=str(cert), json={
            "model": "a", "messages": [{"role": "user", "content": "ab"}], "return_token_strs": True}).json()
        assert "".join(tokens["token_strs"]).startswith("<<pad>im_start<pad>>user")  # (chatml; | and newlines: <pad>)
        out = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "ab"}], temperature=0)
        assert out.usage.prompt_tokens == tokens["count"] and out.usage.total_tokens <= 100
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        stop_process(p)


def test_bad_serving_options_are_named_before_loading(tmp_path, capsys):
    """Each refused before anything loads (the bundle folder does not even exist)."""
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("a key")
    missing = tmp_path / "no-bundle"
    for args, said in ((["--ssl-keyfile", str(not_pem)], "give --ssl-keyfile and --ssl-certfile together"),
                       (["--ssl-keyfile", str(not_pem), "--ssl-certfile", str(not_pem)], "is not a PEM file"),
                       (["--ssl-keyfile", str(tmp_path / "nope.pem"), "--ssl-certfile", str(not_pem)],
                        "is not a PEM file"),
                       (["--enable-auto-tool-choice"], "needs --tool-call-parser"),
                       (["--max-model-len", "1"], "--max-model-len")):
        code, _, err = run_cli(capsys, "serve", missing, *args)
        assert code != 0 and said in " ".join(err.split()), (args, err)
    code, _, err = run_cli(capsys, "gateway", tmp_path / "no-gateway.yaml", "--ssl-certfile", str(not_pem))
    assert code != 0 and "give --ssl-keyfile and --ssl-certfile together" in " ".join(err.split()), err


def test_a_slow_prompt_does_not_hold_the_other_requests(bundles, monkeypatch):
    """A conversation's rendering (a bundle's chat template, a long prompt's tokenizing) runs off the event
    loop, long prompts on a thread of their own: while one is held in it, /health and a short request still
    answer. Before, it ran on the loop and everything waited for it; on one shared thread, the short request
    would have waited."""
    import threading

    b = branchmerge.load(bundles[0.9], dtype="float32")
    entered, release = threading.Event(), threading.Event()
    plain = b.encode_messages
    threads: dict[str, str] = {}
    long = "hold" + " x" * 5000  # over LONG_PROMPT_CHARS

    def held(messages, branch, **kw):
        content = messages[-1]["content"]
        threads[content[:4]] = threading.current_thread().name
        if content == long:
            entered.set()
            assert release.wait(60)
            messages = [{"role": "user", "content": "hold"}]  # (answered as a short one: the context is 128)
        return plain(messages, branch, **kw)

    monkeypatch.setattr(b, "encode_messages", held)
    with serving(create_app(b, max_batch=4, wait_ms=5)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            slow = ex.submit(c.chat.completions.create, model="a", max_tokens=2,
                             messages=[{"role": "user", "content": long}])
            assert entered.wait(30)
            try:
                assert httpx.get(url + "/health", timeout=10).status_code == 200
                other = c.chat.completions.create(model="b", max_tokens=2, timeout=10,
                                                  messages=[{"role": "user", "content": "rev ab="}])
                assert other.choices[0].message.content is not None and not slow.done()
            finally:
                release.set()
            assert slow.result().usage.completion_tokens <= 2
    assert threads["hold"].startswith("branchmerge-long-prompts") and threads["rev "].startswith("branchmerge-prompts")


def test_continuous_usage_stats_in_every_chunk(bundles):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's prompt and completion
    tokens so far (never decreasing, ending at the request's usage); without it, chunks carry none."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    with serving(create_app(b, max_batch=4, wait_ms=5)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        chunks = list(c.completions.create(model="a", prompt="rev abc=", max_tokens=6, stream=True, temperature=0,
                                           stream_options={"include_usage": True, "continuous_usage_stats": True}))
        final, steps = chunks[-1].usage, [ch.usage for ch in chunks[:-1]]
        assert not chunks[-1].choices and all(u is not None for u in steps)
        assert {u.prompt_tokens for u in steps} == {final.prompt_tokens}
        done = [u.completion_tokens for u in steps]
        assert done == sorted(done) and done[0] == 0 and done[-1] == final.completion_tokens
        assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in steps)
        plain = list(c.chat.completions.create(model="a", messages=[{"role": "user", "content": "rev abc="}],
                                               max_tokens=4, stream=True))
        assert all(ch.usage is None for ch in plain)
        two = list(c.chat.completions.create(model="a", messages=[{"role": "user", "content": "rev abc="}], n=2,
                                             max_tokens=3, stream=True, temperature=0.9, seed=1,
                                             stream_options={"continuous_usage_stats": True}))
        last = {ch.choices[0].index: ch.usage.completion_tokens for ch in two if ch.choices}
        assert set(last) == {0, 1} and all(1 <= n <= 3 for n in last.values())


def test_model_retrieve_version_and_ping(bundles):
    """OpenAI's GET /v1/models/{id} (client.models.retrieve), vLLM's /version and /ping: /ping answers without
    the key (as /health, and says no more than it), the others need it; an unknown model is a 404 naming it."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    with serving(create_app(b, max_batch=4, wait_ms=5, api_key="k")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        m = c.models.retrieve("a")
        assert m.id == "a" and m.model_extra["max_model_len"] == 128
        with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
            c.models.retrieve("nope")
        assert httpx.get(url + "/version", headers={"Authorization": "Bearer k"}).json() == \
            {"version": branchmerge.__version__}
        assert httpx.get(url + "/version").status_code == 401
        for method in ("GET", "POST"):
            r = httpx.request(method, url + "/ping")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
        metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"}).text
        assert 'route="/v1/models/{id}"' in metrics and 'route="/ping"' in metrics


def test_cors_only_for_the_allowed_origins(bundles):
    """vLLM's --allowed-origins: a preflight from an allowed origin is answered without the key, every answer
    to it (a 401 too) carries the CORS headers and exposes X-Branchmerge-Branch; another origin gets none, and
    without the option no origin does."""
    b = branchmerge.load(bundles[0.9], dtype="float32")
    ok, evil = "https://app.example", "https://evil.example"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    body = {"model": "a", "messages": [{"role": "user", "content": "rev ab="}], "max_tokens": 2}
    with serving(create_app(b, max_batch=4, wait_ms=5, api_key="k", allowed_origins=[ok])) as url:
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": ok, **pre})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ok
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Origin": ok, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ok
        assert "x-branchmerge-branch" in r.headers["access-control-expose-headers"].lower()
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Origin": ok})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ok
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": evil, **pre})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Origin": evil, "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers
    with serving(create_app(b, max_batch=4, wait_ms=5)) as url:
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": ok, **pre})
        assert r.status_code != 200 and "access-control-allow-origin" not in r.headers


def test_allowed_origins_and_root_path_options(bundles, tmp_path, capsys):
    """Each --allowed-origins value is an origin, *, or a JSON list of them (vLLM's form); anything else is
    refused by name before the bundle loads. Under --root-path (a proxy's prefix, taken off before the request
    arrives) /health stays open and the API answers."""
    from branchmerge.cli.serve_cmd import _origins

    assert _origins(["https://a.example", '["http://b.example:8080", "*"]']) == \
        ["https://a.example", "http://b.example:8080", "*"]
    for bad, says in (("https://a.example/app", "is not an origin"), ("a.example", "is not an origin"),
                      ("[1, 2]", "a JSON list of strings"), ("[oops", "not a JSON list")):
        code, _, err = run_cli(capsys, "serve", tmp_path / "missing-bundle", "--allowed-origins", bad)
        assert code != 0 and says in err, err
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "branchmerge.cli.main", "serve", str(bundles[0.9]), "--port",
                             str(port), "--api-key", "k", "--root-path", "/llm"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = wait_listening(proc, f"http://127.0.0.1:{port}/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}  # open, as without a prefix
        m = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
        assert m.status_code == 200 and "a" in {x["id"] for x in m.json()["data"]}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        stop_process(proc)
