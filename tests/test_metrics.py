"""GET /metrics on `serve` and `gateway`, read with Prometheus' own parser (`prometheus_client`): counts
that follow the requests made, bounded labels whatever a client sends, and the key required."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import branchmerge
from branchmerge.server import create_app
from branchmerge.server.app import build_app
from branchmerge.server.gateway import GatewayService, load_gateway_config
from tests.serving import serving, wait_queued

KEY = "sk-metrics"


def scrape(url: str, key: str | None = KEY) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, parsed (and so validated) by prometheus_client."""
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(after, before, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def served(bundles, tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics") / "bundle"
    shutil.copytree(bundles[0.9], d)
    bundle = branchmerge.load(d)
    app = create_app(bundle, api_key=KEY, max_batch=16, wait_ms=20)
    with serving(app) as url:
        yield {"url": url, "app": app, "bundle": bundle,
               "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)}


def test_metrics_need_the_key(served):
    assert httpx.get(served["url"] + "/metrics").status_code == 401
    assert httpx.get(served["url"] + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_token_and_request_counts_follow_the_requests(served):
    url, c = served["url"], served["client"]
    before = scrape(url)
    r1 = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "rev abc="}], max_tokens=6)
    r2 = c.completions.create(model="b", prompt="rev hello=", max_tokens=5)
    streamed = list(c.completions.create(model="a", prompt="add 1+2=", max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}))
    usage_a = streamed[-1].usage
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert httpx.get(url + "/no/such/path", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    after = scrape(url)

    gen = r1.usage.completion_tokens + r2.usage.completion_tokens
    assert delta(after, before, "branchmerge_generation_tokens_total", branch="b") == gen
    assert delta(after, before, "branchmerge_prompt_tokens_total", branch="b") == \
        r1.usage.prompt_tokens + r2.usage.prompt_tokens
    assert delta(after, before, "branchmerge_generation_tokens_total", branch="a") == usage_a.completion_tokens
    # the streamed request's first token: one sample, for its branch, within the request's own duration
    assert delta(after, before, "branchmerge_time_to_first_token_seconds_count", branch="a") == 1
    assert 0 < delta(after, before, "branchmerge_time_to_first_token_seconds_sum", branch="a") < \
        delta(after, before, "branchmerge_http_request_duration_seconds_sum", route="/v1/completions")
    assert delta(after, before, "branchmerge_time_to_first_token_seconds_count", branch="b") == 0  # not streamed
    assert delta(after, before, "branchmerge_answers_total", model="b", branch="b") == 2
    assert delta(after, before, "branchmerge_answers_total", model="a", branch="a") == 1
    assert delta(after, before, "branchmerge_http_requests_total", route="/v1/completions", status="200") == 2
    assert delta(after, before, "branchmerge_http_requests_total", route="/v1/completions", status="404") == 1
    assert delta(after, before, "branchmerge_http_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta(after, before, "branchmerge_http_requests_total", route="other", status="404") == 1
    # a stream is timed to its last byte: its duration sample is in the histogram like any other
    assert delta(after, before, "branchmerge_http_request_duration_seconds_count", route="/v1/completions") == 3
    # what a client names never becomes a label: only the server's own routes, models and branches
    labels = {v for (_, ls) in after for _, v in ls}
    assert not any("no-such" in v or "/no/" in v for v in labels)
    assert after[("branchmerge_num_requests_waiting", ())] == 0


def test_a_mixed_batch_is_seen_as_one(served):
    """Twelve rows over three branches run as one batch: one sample of 12 rows and 3 branches."""
    url, c, engine = served["url"], served["client"], served["app"].state.engine
    prompts = [("add 1+1=", "a"), ("rev abc=", "b"), ("key zz=", "c")] * 4
    before = scrape(url)
    with ThreadPoolExecutor(12) as ex:
        with engine.paused():
            futs = [ex.submit(c.completions.create, model=b, prompt=p, max_tokens=3) for p, b in prompts]
            wait_queued(engine, 12, futures=futs)
            assert scrape(url)[("branchmerge_num_requests_waiting", ())] == 12
        [f.result() for f in futs]
    after = scrape(url)
    hist = "branchmerge_batch_branches_bucket"
    assert delta(after, before, "branchmerge_batch_branches_count", kind="generate") == 1
    assert delta(after, before, hist, kind="generate", le="2.0") == 0
    assert delta(after, before, hist, kind="generate", le="4.0") == 1
    assert delta(after, before, "branchmerge_batch_size_bucket", kind="generate", le="8.0") == 0
    assert delta(after, before, "branchmerge_batch_size_bucket", kind="generate", le="16.0") == 1
    assert delta(after, before, "branchmerge_batch_size_sum", kind="generate") == 12
    for name, labels in after:  # histograms are cumulative and end at their count
        if name.endswith("_bucket") and dict(labels)["le"] == "+Inf":
            rest = tuple(kv for kv in labels if kv[0] != "le")
            assert after[(name.replace("_bucket", "_count"), rest)] == after[(name, labels)]


def test_kept_kv_tokens_are_counted(served):
    """A request that joins a running one: the running row's text is not prefilled again, and
    kv_reused_tokens_total says how many tokens that saved (the engine's own count)."""
    import time

    url, c, engine = served["url"], served["client"], served["app"].state.engine
    before, reused = scrape(url), engine.reused_tokens
    with ThreadPoolExecutor(1) as ex:
        long = ex.submit(c.completions.create, model="a", prompt="rev hello=", max_tokens=100,
                         extra_body={"ignore_eos": True})
        end = time.monotonic() + 30
        while engine.running == 0:
            assert time.monotonic() < end
            time.sleep(0.001)
        c.completions.create(model="b", prompt="add 2+2=", max_tokens=3)
        assert long.result().usage.completion_tokens == 100
    saved = delta(scrape(url), before, "branchmerge_kv_reused_tokens_total")
    assert saved == engine.reused_tokens - reused >= len("rev hello=")  # at least the running row's prompt


def test_a_conversations_next_turn_reuses_its_cache_within_its_salt(served):
    """The prefix cache through the API: a chat's next turn prefills only what it adds (kv_reused_tokens_total
    grows, prefix_cache_tokens holds the turns); with another cache_salt (vLLM's) it finds nothing; the
    answers are the same either way."""
    url, c = served["url"], served["client"]
    msgs = [{"role": "user", "content": "rev the quick brown fox jumps over="}]
    first = c.chat.completions.create(model="a", messages=msgs, max_tokens=6, extra_body={"cache_salt": "t1"})
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "add 1+2="}]
    before = scrape(url)
    other = c.chat.completions.create(model="a", messages=msgs, max_tokens=6, extra_body={"cache_salt": "t2"})
    mid = scrape(url)
    same = c.chat.completions.create(model="a", messages=msgs, max_tokens=6, extra_body={"cache_salt": "t1"})
    after = scrape(url)
    assert delta(mid, before, "branchmerge_kv_reused_tokens_total") == 0
    assert delta(after, mid, "branchmerge_kv_reused_tokens_total") >= len(msgs[0]["content"])
    assert after[("branchmerge_prefix_cache_tokens", ())] > 0
    assert same.choices[0].message.content == other.choices[0].message.content


def test_gateway_metrics_count_upstreams(served, tmp_path):
    cfg = {"upstreams": {"u": {"base_url": served["url"] + "/v1", "api_key_env": "BM_METRICS_KEY"},
                         "down": {"base_url": "http://127.0.0.1:9/v1", "connect_timeout_s": 1}},
           "branches": {"a": {"upstream": "u"}, "b": {"upstream": "down"}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    import os

    os.environ["BM_METRICS_KEY"] = KEY
    try:
        service = GatewayService.from_config(load_gateway_config(tmp_path / "g.yaml"))
    finally:
        del os.environ["BM_METRICS_KEY"]
    with serving(build_app(service)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model="a", prompt="add 1+1=", max_tokens=3)
        last = list(c.completions.create(model="a", prompt="add 2+2=", max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}))[-1]
        list(c.completions.create(model="a", prompt="add 3+3=", max_tokens=2, stream=True))  # no usage: not counted
        with pytest.raises(openai.APIStatusError):
            c.completions.create(model="b", prompt="rev abc=", max_tokens=3)
        m = scrape(url, key=None)  # this gateway has no key of its own
    assert m[("branchmerge_answers_total", (("branch", "a"), ("model", "a")))] == 3
    # tokens as the upstream reported them: the answer's usage and the stream's closing usage event
    assert m[("branchmerge_generation_tokens_total", (("branch", "a"),))] == \
        r.usage.completion_tokens + last.usage.completion_tokens > 0
    assert m[("branchmerge_prompt_tokens_total", (("branch", "a"),))] == r.usage.prompt_tokens + last.usage.prompt_tokens
    assert m[("branchmerge_upstream_errors_total", (("code", "upstream_unreachable"), ("upstream", "down")))] == 1
    assert m[("branchmerge_upstream_in_flight", (("upstream", "u"),))] == 0
    assert m[("branchmerge_http_requests_total", (("route", "/v1/completions"), ("status", "502")))] == 1
