"""The OpenAI-compatible server on a real loopback port, with the real `openai` SDK as the client."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import yaml

import branchmerge
from branchmerge.errors import ConfigError
from branchmerge.runtime.text import cut_at_stop
from branchmerge.server import create_app
from branchmerge.staged import PipelinesConfig, answer, load_pipelines
from tests.serving import routed_bundle, serving, wait_queued

KEY = "sk-test-123"
PIPES = {
    "pipelines": [{"name": "two_step", "stages": [
        {"branch": "a", "user": "{question}", "max_tokens": 6},
        {"branch": "b", "user": "{previous}=", "max_tokens": 4},
    ]}, {"name": "digit", "stages": [
        {"branch": "a", "user": "{question}", "max_tokens": 8, "extract": r"[0-9a-z]"},
    ]}, {"name": "runaway", "stages": [  # 2^n backtracking on any output of n word characters without Han
        {"branch": "b", "user": "{question}", "max_tokens": 40, "chat": False, "extract": r"(?:(\w)|.)*\p{Han}"},
    ]}],
    "routes": {"c": "two_step"},
}


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    bundle = routed_bundle(bundles[0.9], tmp_path_factory.mktemp("srv") / "bundle", PIPES)
    app = create_app(bundle, api_key=KEY, max_batch=16, wait_ms=50, max_tokens_limit=64)
    with serving(app) as url:
        yield {"url": url, "bundle": bundle, "app": app,
               "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)}


def test_health_and_models(server):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    models = server["client"].models.list().data
    assert {m.id for m in models} == {"a", "b", "c", "two_step", "digit", "runaway", "auto"}
    ctx = server["bundle"].reader.hf_config("a")["max_position_embeddings"]
    assert all(m.model_extra["max_model_len"] == ctx for m in models)  # as vLLM lists it


def test_chat_and_completion_match_library(server):
    c, bundle = server["client"], server["bundle"]
    expected = bundle.generate("rev abc=", "b", max_new_tokens=8)[0]
    r = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "rev abc="}], max_tokens=8)
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(bundle.encode("rev abc=", "b"))
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["branch"] == "b"
    t = c.completions.create(model="b", prompt="rev abc=", max_tokens=8)
    lib = bundle.generate_ids([bundle.tokenizer("b")("rev abc=")["input_ids"]], ["b"], max_new_tokens=8)[0]
    assert t.choices[0].text == lib.text and t.choices[0].finish_reason == lib.finish_reason


def test_streaming_matches_non_streaming(server):
    c = server["client"]
    full = c.chat.completions.create(model="a", messages=[{"role": "user", "content": "add 2+3="}], max_tokens=10)
    chunks = list(c.chat.completions.create(model="a", messages=[{"role": "user", "content": "add 2+3="}],
                                            max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    comp = "".join(ch.choices[0].text for ch in c.completions.create(model="a", prompt="add 2+3=", max_tokens=10,
                                                                       stream=True))
    assert comp == full.choices[0].message.content
    with httpx.stream("POST", server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "a", "prompt": "add 2+3=", "max_tokens": 4, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_streams_end_with_usage_when_asked(server):
    """``stream_options={"include_usage": True}`` (OpenAI, vLLM): a last chunk with no choices carries the
    request's usage, the same as the non-streamed response's; without it no such chunk is sent."""
    c = server["client"]
    msgs = [{"role": "user", "content": "add 2+3="}]
    full = c.chat.completions.create(model="a", messages=msgs, max_tokens=10, n=2)
    chunks = list(c.chat.completions.create(model="a", messages=msgs, max_tokens=10, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(ch.choices for ch in chunks[:-1])
    plain = list(c.chat.completions.create(model="a", messages=msgs, max_tokens=10, stream=True))
    assert all(ch.choices and ch.usage is None for ch in plain)
    texts = ["rev abc=", "add 1+1="]
    full = c.completions.create(model="auto", prompt=texts, max_tokens=6)
    last = list(c.completions.create(model="auto", prompt=texts, max_tokens=6, stream=True,
                                     stream_options={"include_usage": True}))[-1]
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    full = c.chat.completions.create(model="two_step", messages=[{"role": "user", "content": "add 1+1="}])
    last = list(c.chat.completions.create(model="two_step", messages=[{"role": "user", "content": "add 1+1="}],
                                          stream=True, stream_options={"include_usage": True}))[-1]
    assert last.usage.model_dump() == full.usage.model_dump() and full.usage.completion_tokens > 0


def test_a_seed_makes_sampling_reproducible(server):
    """A sampled request with a ``seed`` gives the same text whatever else the server samples meanwhile;
    choice k of ``n`` samples under seed + k."""
    c = server["client"]

    def sample(seed=None, n=1, prompt="rev abcdef="):
        r = c.completions.create(model="b", prompt=prompt, max_tokens=12, temperature=2.0, seed=seed, n=n)
        return [ch.text for ch in r.choices]

    first = sample(7)
    from transformers import LogitsProcessorList

    from branchmerge.runtime.sampling import RowSampler, RowSettings

    b = server["bundle"]
    lib = b.generate_ids([b.encode("rev abcdef=", "b", chat=False)], ["b"], max_new_tokens=12,
                         logits_processor=LogitsProcessorList([RowSampler([RowSettings(2.0, seed=7)])]))[0].text
    assert first == [lib]  # the library's sampler, as `branchmerge generate --seed` uses it
    with ThreadPoolExecutor(6) as pool:  # others sampling at the same time, unseeded and seeded
        noise = [pool.submit(sample, None, 2, "key xyz=") for _ in range(4)] + [pool.submit(sample, 9)]
        again = pool.submit(sample, 7)
        assert again.result() == first
        [f.result() for f in noise]
    assert sample(7, n=2) == first + sample(8)
    assert len({sample(s)[0] for s in range(7, 13)}) > 1  # the seed is what fixes it


def test_different_sampling_settings_share_one_batch(server):
    """Greedy, seeded and unseeded requests at different temperatures and top-p run as one batch, each
    row with its own settings: each seeded one equals its answer alone, the greedy one the library's."""
    c, bundle, engine = server["client"], server["bundle"], server["app"].state.engine
    reqs = [dict(prompt="rev abcdef=", temperature=2.0, seed=3), dict(prompt="add 1+2=", temperature=0.7, seed=4),
            dict(prompt="key zz=", temperature=1.3, top_p=0.5, seed=5), dict(prompt="rev hello=", temperature=0.0),
            dict(prompt="add 3+3=", temperature=1.0), dict(prompt="rev abcdef=", temperature=2.0, seed=3)]
    branch = {"r": "b", "a": "a", "k": "c"}

    def call(kw):
        return c.completions.create(model=branch[kw["prompt"][0]], max_tokens=10, **kw).choices[0].text

    alone = [call(kw) for kw in reqs[:3]]
    before = engine.batches
    with ThreadPoolExecutor(len(reqs)) as ex:
        with engine.paused():
            futs = [ex.submit(call, kw) for kw in reqs]
            wait_queued(engine, len(reqs), futures=futs)
        got = [f.result() for f in futs]
    assert engine.batches - before == 1
    assert got[:3] == alone and got[5] == got[0]
    assert got[3] == bundle.generate("rev hello=", "b", max_new_tokens=10)[0]
    # vLLM's top_k and min_p: top_k=1, or min_p=1, keeps only the likeliest token, so even at temperature 2
    # the answer is the greedy one; a top_k of -1 (vLLM's "all") is accepted, -2 is not
    greedy = bundle.generate("rev abcdef=", "b", max_new_tokens=10, chat=False)[0]
    for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_k": 1, "min_p": 0.5, "top_p": 0.9}):
        r = c.completions.create(model="b", prompt="rev abcdef=", max_tokens=10, temperature=2.0, seed=9,
                                 extra_body=extra)
        assert r.choices[0].text == greedy, extra
    assert call(dict(prompt="rev abcdef=", temperature=2.0, seed=3, extra_body={"top_k": -1})) == got[0]
    for bad in (-2, 10**30):  # a top_k past int64 used to fail the whole batch it ran in (a 500 for each row)
        with pytest.raises(openai.BadRequestError, match="top_k"):
            call(dict(prompt="rev a=", temperature=1.0, extra_body={"top_k": bad}))


def test_penalties_and_logit_bias_equal_a_reference_decoder(server):
    """OpenAI's presence and frequency penalties (on the tokens generated so far) and logit_bias, in a
    batch with other rows, give what a plain greedy loop over the branch's model gives with the same formula;
    a biased token id outside the branch's vocabulary is a 400 naming logit_bias."""
    c, bundle = server["client"], server["bundle"]
    tok = bundle.tokenizer("b")

    def reference(prompt: str, n: int, presence=0.0, frequency=0.0, bias=None) -> str:
        ids = bundle.encode(prompt, "b", chat=False)
        new: list[int] = []
        with bundle.use("b") as m, torch.no_grad():
            for _ in range(n):
                logits = m(torch.tensor([ids + new])).logits[0, -1].float()
                for t, v in (bias or {}).items():
                    logits[t] += v
                counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.shape[0]).float()
                logits -= frequency * counts + presence * (counts > 0).float()
                t = int(logits.argmax())
                if t in bundle.stop_ids("b"):
                    break
                new.append(t)
        return tok.decode(new, skip_special_tokens=True)

    plain = reference("rev abcabc=", 12)
    cases = [dict(presence_penalty=1.5), dict(frequency_penalty=2.0), dict(presence_penalty=-1.0, frequency_penalty=0.5),
             dict(logit_bias={str(tok.convert_tokens_to_ids("z")): 8.0})]
    with ThreadPoolExecutor(len(cases) + 1) as ex:
        futs = [ex.submit(c.completions.create, model="b", prompt="rev abcabc=", max_tokens=12, **kw) for kw in cases]
        futs.append(ex.submit(c.completions.create, model="b", prompt="rev abcabc=", max_tokens=12))
        got = [f.result().choices[0].text for f in futs]
    want = [reference("rev abcabc=", 12, presence=1.5), reference("rev abcabc=", 12, frequency=2.0),
            reference("rev abcabc=", 12, presence=-1.0, frequency=0.5),
            reference("rev abcabc=", 12, bias={tok.convert_tokens_to_ids("z"): 8.0}), plain]
    assert got == want and len(set(want)) > 2  # the settings do change the answer
    one = c.completions.create(model="b", prompt="rev abcabc=", max_tokens=1, echo=True, logprobs=1,
                               logit_bias={str(tok.convert_tokens_to_ids("z")): 50.0})
    assert one.choices[0].text.endswith("z")  # the one-token scoring shortcut does not skip the bias
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary") as e:
        c.completions.create(model="b", prompt="rev a=", max_tokens=2, logit_bias={"99999": 5})
    assert e.value.body["param"] == "logit_bias"


def test_repetition_penalty_equals_transformers(server):
    """vLLM's repetition_penalty (on the prompt's and the answer's tokens), in a batch with a plain request,
    gives what transformers' own RepetitionPenaltyLogitsProcessor gives the branch's model alone."""
    c, b = server["client"], server["bundle"]
    ids = b.encode("rev abcabc=", "b", chat=False)
    want = []
    for penalty in (1.3, 0.7):
        with b.use("b") as m, torch.no_grad():
            out = m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                             eos_token_id=sorted(b.stop_ids("b")), pad_token_id=0, temperature=None, top_p=None,
                             top_k=None)
        want.append(b.tokenizer("b").decode(out[0, len(ids):], skip_special_tokens=True))
    with ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(c.completions.create, model="b", prompt="rev abcabc=", max_tokens=12,
                          extra_body={"repetition_penalty": p}) for p in (1.3, 0.7)]
        futs.append(ex.submit(c.completions.create, model="b", prompt="rev abcabc=", max_tokens=12))
        got = [f.result().choices[0].text for f in futs]
    assert got[:2] == want and got[2] == b.generate("rev abcabc=", "b", max_new_tokens=12, chat=False)[0]
    assert len(set(got)) == 3  # the penalty changes the answer, both ways
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        c.completions.create(model="b", prompt="rev a=", max_tokens=2, extra_body={"repetition_penalty": 0})


def test_vllm_stopping_settings(server):
    """ignore_eos, min_tokens and stop_token_ids per request, streamed or not, as the library runs them; bad
    values are 400s that name the field."""
    c, b = server["client"], server["bundle"]
    ids = b.encode("add 5+5=", "a", chat=False)
    plain = b.generate_ids([ids], ["a"], max_new_tokens=20)[0]
    assert plain.finish_reason == "stop"  # ends with its end of text within 20 tokens

    def both(**extra):
        r = c.completions.create(model="a", prompt="add 5+5=", max_tokens=20, extra_body=extra)
        events = list(c.completions.create(model="a", prompt="add 5+5=", max_tokens=20, stream=True, extra_body=extra))
        streamed = "".join(e.choices[0].text for e in events if e.choices)
        assert streamed == r.choices[0].text and events[-1].choices[0].finish_reason == r.choices[0].finish_reason
        return r.choices[0], r.usage.completion_tokens

    first, n = both()
    assert (first.text, first.finish_reason, n) == (plain.text, "stop", len(plain.new_ids))
    longer, n = both(ignore_eos=True)
    assert n == 20 and longer.finish_reason == "length" and longer.text.startswith(plain.text)
    k = next(i for i, t in enumerate(plain.new_ids) if i and t not in plain.new_ids[:i])
    cut, n = both(stop_token_ids=[plain.new_ids[k]])
    assert n == k and cut.finish_reason == "stop" and cut.text == b.tokenizer("a").decode(plain.new_ids[:k])
    late, n = both(min_tokens=len(plain.new_ids) + 2)
    assert n >= len(plain.new_ids) + 2 and late.text.startswith(plain.text)
    for extra, field in (({"min_tokens": 30}, "min_tokens"), ({"stop_token_ids": [999]}, "stop_token_ids"),
                         ({"stop_token_ids": list(range(65))}, "stop_token_ids")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="a", prompt="add 5+5=", max_tokens=20, extra_body=extra)
        assert field in str(e.value.body), e.value.body


def test_a_stop_string_ends_its_rows_generation(server):
    """A request's ``stop`` ends its row's generation where the text first holds one (the tokens counted are
    those up to it, not max_tokens); the text is cut before it, streamed or not."""
    c, b = server["client"], server["bundle"]
    tok = b.tokenizer("a")
    full = b.generate_ids([b.encode("rev hello=", "a", chat=False)], ["a"], max_new_tokens=16)[0]
    assert len(full.new_ids) == 16
    stop = full.text[4:7]
    k = next(k for k in range(1, 17) if stop in tok.decode(full.new_ids[:k], skip_special_tokens=True))
    r = c.completions.create(model="a", prompt="rev hello=", max_tokens=16, stop=[stop, "never§"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full.text[:full.text.index(stop)], "stop")
    assert r.usage.completion_tokens == k < 16
    events = list(c.completions.create(model="a", prompt="rev hello=", max_tokens=16, stop=stop, stream=True))
    assert "".join(e.choices[0].text for e in events if e.choices) == r.choices[0].text
    assert events[-1].choices[0].finish_reason == "stop"
    # a stop string of three tokens: a stream sends neither of the first two; one that never completes
    # (its first character ends the text) is sent at the end
    for stops, reason in (([tok.decode(full.new_ids[4:7])], "stop"), ([full.text[-1] + "§"], "length")):
        r = c.completions.create(model="a", prompt="rev hello=", max_tokens=16, stop=stops)
        events = list(c.completions.create(model="a", prompt="rev hello=", max_tokens=16, stop=stops, stream=True))
        streamed = "".join(e.choices[0].text for e in events if e.choices)
        assert streamed == r.choices[0].text == cut_at_stop(full.text, stops)[0], stops
        assert events[-1].choices[0].finish_reason == r.choices[0].finish_reason == reason


def test_min_tokens_holds_back_a_stop_string(server):
    """vLLM's min_tokens with a stop string: the string in the first min_tokens - 1 tokens neither ends the
    row nor cuts its text; the first one a later token completes does, streamed or not."""
    c, b = server["client"], server["bundle"]
    tok = b.tokenizer("a")
    full = b.generate_ids([b.encode("rev hello=", "a", chat=False)], ["a"], max_new_tokens=24)[0]
    texts = [tok.decode(full.new_ids[:k], skip_special_tokens=True) for k in range(25)]
    # a character that occurs early and again after the 4th token
    stop = next(ch for ch in full.text[:3] if ch in texts[24][len(texts[4]):] and ch.strip())
    first = next(k for k in range(1, 25) if stop in texts[k])
    again = next(k for k in range(5, 25) if stop in texts[k][len(texts[4]):])
    assert first < 5 <= again
    r = c.completions.create(model="a", prompt="rev hello=", max_tokens=24, stop=[stop],
                             extra_body={"min_tokens": 5})
    want = full.text[:full.text.index(stop, len(texts[4]))]
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (want, "stop", again)
    events = list(c.completions.create(model="a", prompt="rev hello=", max_tokens=24, stop=[stop], stream=True,
                                       extra_body={"min_tokens": 5}))
    assert "".join(e.choices[0].text for e in events if e.choices) == want
    plain = c.completions.create(model="a", prompt="rev hello=", max_tokens=24, stop=[stop])
    assert plain.usage.completion_tokens == first and plain.choices[0].text == full.text[:full.text.index(stop)]


def lib_text(bundle, pipeline: str, question: str) -> str:
    return answer(bundle, [question], pipeline=pipeline)[0][-1].text


def test_auto_routing_and_pipeline(server):
    c = server["client"]
    r = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "rev hello="}], max_tokens=4)
    assert r.model_extra["branch"] == "b"
    p = c.chat.completions.create(model="two_step", messages=[{"role": "user", "content": "add 1+1="}])
    stages = p.model_extra["stages"]
    assert [s["branch"] for s in stages] == ["a", "b"]
    assert p.choices[0].message.content == stages[-1]["text"]
    # a question routed to `c` runs the pipeline that `routes` names
    routed = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "key zz="}])
    assert [s["branch"] for s in routed.model_extra["stages"]] == ["a", "b"]
    lib = answer(server["bundle"], ["add 1+1="], pipeline="two_step")[0]
    assert [s.text for s in lib] == [s["text"] for s in stages]
    # the finish reason is the last stage's (here it ran out of its max_tokens)
    assert lib[-1].finish_reason == "length" and p.choices[0].finish_reason == "length"
    # streamed, the last stage's tokens come as they are made (the stages before run first), then the finish
    # reason; through completions too
    chunks = list(c.chat.completions.create(model="two_step", messages=[{"role": "user", "content": "add 1+1="}],
                                            stream=True))
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert "".join(texts) == stages[-1]["text"] and len(texts) >= 2
    assert chunks[-1].choices[0].finish_reason == "length" and all(ch.model_extra["branch"] == "b" for ch in chunks)
    parts = [ch.choices[0].text for ch in c.completions.create(model="two_step", prompt="add 1+1=", stream=True)]
    assert "".join(parts) == lib_text(server["bundle"], "two_step", "add 1+1=") and len([p for p in parts if p]) >= 2
    # a last stage with `extract` must see its whole output: its answer comes as one chunk
    whole = c.chat.completions.create(model="digit", messages=[{"role": "user", "content": "rev abc="}])
    one = [ch.choices[0] for ch in c.chat.completions.create(model="digit", messages=[{"role": "user",
                                                                                       "content": "rev abc="}],
                                                             stream=True)]
    assert [ch.delta.content for ch in one if ch.delta.content] == [whole.choices[0].message.content]
    assert len(whole.choices[0].message.content) == 1


def test_responses_api_routes_and_runs_pipelines(server):
    """/v1/responses with model auto is routed as chat is, and a pipeline answers with its stages (streamed:
    the last stage's text as deltas)."""
    c = server["client"]
    r = c.responses.create(model="auto", input="rev hello=", max_output_tokens=4)
    assert r.model_extra["branch"] == "b"
    p = c.responses.create(model="two_step", input="add 1+1=")
    lib = answer(server["bundle"], ["add 1+1="], pipeline="two_step")[0]
    assert [s["text"] for s in p.model_extra["stages"]] == [s.text for s in lib] and p.output_text == lib[-1].text
    assert p.status == "incomplete"  # (its last stage ran out of max_tokens, as the chat test says)
    events = list(c.responses.create(model="two_step", input="add 1+1=", stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == lib[-1].text and len(deltas) >= 2 and events[-1].response.output_text == lib[-1].text
    with pytest.raises(openai.BadRequestError, match="`n` is not supported"):
        c.responses.create(model="a", input="rev a=", extra_body={"n": 2})


def test_pipelines_hold_no_thread_while_they_wait(server):
    """Pipeline stages are engine jobs the request awaits: with the engine paused, three pipeline requests
    and a routed one all queue (pipelines used to hold the two worker threads that routing needs, so
    `auto` waited for them), and they batch together; the answers are the library's."""
    c, engine = server["client"], server["app"].state.engine
    msgs = [{"role": "user", "content": "add 1+1="}]
    with ThreadPoolExecutor(4) as ex:
        with engine.paused():
            pipes = [ex.submit(c.chat.completions.create, model="two_step", messages=msgs) for _ in range(3)]
            wait_queued(engine, 3)
            auto = ex.submit(c.chat.completions.create, model="auto",
                             messages=[{"role": "user", "content": "rev hello="}], max_tokens=4)
            wait_queued(engine, 4)
        lib = [s.text for s in answer(server["bundle"], ["add 1+1="], pipeline="two_step")[0]]
        assert all([s["text"] for s in f.result().model_extra["stages"]] == lib for f in pipes)
        assert auto.result().model_extra["branch"] == "b"


def test_a_pipeline_whose_client_goes_away_stops(server):
    """Its queued stage is withdrawn at once, and no later stage runs."""
    engine = server["app"].state.engine
    body = {"model": "two_step", "messages": [{"role": "user", "content": "add 1+1="}]}
    gave_up = []

    def client():
        try:
            httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=httpx.Timeout(1.0, connect=5),
                       headers={"Authorization": f"Bearer {KEY}"})
        except httpx.TimeoutException:
            gave_up.append(True)

    with engine.paused():
        before = engine.cancelled_jobs
        th = threading.Thread(target=client)
        th.start()
        wait_queued(engine, 1)
        th.join(timeout=30)
        end = time.monotonic() + 15
        while engine.queued() and time.monotonic() < end:
            time.sleep(0.05)
        assert gave_up and engine.queued() == 0  # withdrawn while the engine was still paused
    batches = engine.batches
    time.sleep(0.5)
    assert engine.batches == batches and engine.cancelled_jobs == before  # nothing ran for it afterwards


def test_concurrent_auto_requests_are_routed_in_one_batch(server, monkeypatch):
    """Texts that arrive while routing is busy are embedded together (one forward), each request gets its
    own route (the library's), and a text that cannot be routed fails alone, not its whole batch."""
    service, bundle = server["app"].state.service, server["bundle"]
    # questions no other test routes: one the router remembers would be answered at once, not batched
    texts = ["rev hellooo=", "key zzz=", "add 1+23=", "rev abcd=", "poison", "key abb="]
    real = service.front.route_many

    def route_many(batch):  # an input the router refuses (as it refuses an empty one), inside a batch
        if "poison" in batch:
            raise ConfigError("cannot route this question")
        return real(batch)

    monkeypatch.setattr(service.front, "route_many", route_many)
    sizes = server["app"].state.metrics.families["branchmerge_route_batch_size"]
    before = sizes.get(), sizes.hist.get((), [0.0] * 11)[-2]
    release = threading.Event()
    busy = [service._aux.submit(release.wait) for _ in range(2)]  # both worker threads held: routing waits

    def call(text):
        return httpx.post(server["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 2},
                          timeout=60)

    try:
        with ThreadPoolExecutor(len(texts)) as ex:
            futs = [ex.submit(call, texts[0])]
            end = time.monotonic() + 30
            while sizes.get() < before[0] + 1 and time.monotonic() < end:
                time.sleep(0.01)  # the first text is taken as a batch of its own, and waits for a thread
            futs += [ex.submit(call, t) for t in texts[1:]]
            while len(service._routes.pending) < len(texts) - 1 and time.monotonic() < end:
                time.sleep(0.01)
            assert len(service._routes.pending) == len(texts) - 1
            release.set()
            got = [f.result() for f in futs]
    finally:
        release.set()  # never leave the server's worker threads held for the tests after this one
    for b in busy:
        b.result()
    assert sizes.get() - before[0] == 2 and sizes.hist[()][-2] - before[1] == len(texts)  # 1 + 5 texts
    for text, r in zip(texts, got):
        if text != "poison":
            routed = bundle.router.route([text])[0]
            assert r.status_code == 200, r.text
            if routed in service.front.pipelines.routes:  # `c` runs the pipeline that `routes` names
                assert [st["branch"] for st in r.json()["stages"]] == ["a", "b"]
            else:
                assert r.json()["branch"] == routed
        else:
            assert r.status_code == 400 and "cannot route this question" in r.json()["error"]["message"]


def test_auto_scores_a_question_and_its_answers_on_one_branch(server):
    """lm_eval batches a question with each answer (context + continuation, one prompt each). With `auto`,
    prompts that share at least half of themselves are routed on that shared context, as the in-process
    backend routes on the context: every answer is scored on one branch, even one whose whole text alone
    routes elsewhere."""
    bundle = server["bundle"]
    ctx, answers = "key abcd=", [" key zz", " add 1+2", " rev ab"]
    whole = [bundle.router.route([ctx + a])[0] for a in answers]
    assert len(set(whole)) > 1  # the case this test is about: alone, the answers would split
    app = create_app(bundle, pipelines=PipelinesConfig())  # no routes to pipelines: scoring needs a branch
    with serving(app) as url:
        body = {"model": "auto", "prompt": [ctx + a for a in answers], "max_tokens": 1, "logprobs": 1, "echo": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [ch["branch"] for ch in r.json()["choices"]] == [bundle.router.route([ctx])[0]] * len(answers)
        one = httpx.post(url + "/v1/completions", json={**body, "prompt": ctx + answers[1]}, timeout=60).json()
        assert one["branch"] == whole[1]  # a prompt alone is routed on its whole text, as before
        unrelated = {**body, "prompt": ["key abcd= add 1+2 add 3+4", "key zz= rev abc rev hello"]}
        got = httpx.post(url + "/v1/completions", json=unrelated, timeout=60).json()
        assert [ch["branch"] for ch in got["choices"]] == [bundle.router.route([p])[0] for p in unrelated["prompt"]]


def test_bad_requests_get_openai_errors(server):
    c, url = server["client"], server["url"]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "nope" in str(e.value) and "available" in str(e.value)
    for kw, needle in [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 1000}, "limit"),
                       ({"messages": []}, "messages")]:
        args = {"model": "a", "messages": [{"role": "user", "content": "x"}], **kw}
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**args)
        assert needle in str(e.value)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="a", prompt="a" * 120, max_tokens=20)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "error" in r.json() and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "a"}, headers=h)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    for bad in (None, "Bearer wrong"):
        r = httpx.get(url + "/v1/models", headers={} if bad is None else {"Authorization": bad})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # still serving
    assert c.completions.create(model="a", prompt="add 1+1=", max_tokens=2).choices[0].text == \
        server["bundle"].generate("add 1+1=", "a", max_new_tokens=2)[0]


def test_concurrent_requests_are_batched(server):
    c, bundle, engine = server["client"], server["bundle"], server["app"].state.engine
    prompts = [("add 1+1=", "a"), ("rev abc=", "b"), ("key zz=", "c"), ("add 3+4=", "a")] * 4
    expected = [bundle.generate(p, b, max_new_tokens=6)[0] for p, b in prompts]
    before = engine.batches

    def call(pb):
        p, b = pb
        return c.completions.create(model=b, prompt=p, max_tokens=6).choices[0].text

    with ThreadPoolExecutor(16) as ex:
        with engine.paused():  # all 16 queue up first, whatever the timing
            futs = [ex.submit(call, pb) for pb in prompts]
            wait_queued(engine, 16, futures=futs)
        got = [f.result() for f in futs]
    assert got == expected
    assert engine.batches - before == 1  # one mixed-branch batch of 16 rows over three branches


def test_pipeline_config_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"pipelines": [{"name": "x", "stages": [{"user": "{previous}"}]}]}))
    with pytest.raises(ConfigError, match="first stage has no"):
        load_pipelines(f)
    f.write_text(yaml.safe_dump({"pipelines": [{"name": "x", "stages": [{"user": "{answer}"}]}]}))
    with pytest.raises(ConfigError, match=r"unknown template field\(s\) \['answer'\]"):
        load_pipelines(f)
    f.write_text(yaml.safe_dump({"pipelines": [], "routes": {"a": "missing"}}))
    with pytest.raises(ConfigError, match="unknown pipeline 'missing'"):
        load_pipelines(f)
    cfg = PipelinesConfig.model_validate({"pipelines": [{"name": "x", "stages": [{"branch": "zz"}]}]})
    with pytest.raises(ConfigError, match="unknown branch 'zz'"):
        cfg.check_branches(["a", "b"])


def test_a_question_that_contains_a_slot_name_is_left_as_written():
    """Stage 2 sees the user's question as typed: its literal ``{previous}`` is not replaced by stage 1's
    answer (two chained ``str.replace`` calls did that)."""
    from branchmerge.staged import fill

    q = "what does {previous} mean in a template?"
    assert fill("Q: {question}\nA: {previous}", q, "ANSWER") == f"Q: {q}\nA: ANSWER"
    assert fill("{previous}|{question}", "{question}", "{previous}") == "{previous}|{question}"


@pytest.mark.parametrize("batch", [1, 3])
def test_lm_eval_client_generate_until(server, monkeypatch, batch):
    """lm-evaluation-harness's own OpenAI-completions client drives the server (generate_until), one prompt
    per request or several (its ``batch_size``)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(base_url=server["url"] + "/v1/completions", model="b", tokenizer_backend=None,
                             tokenized_requests=False, num_concurrent=4, max_gen_toks=6, max_retries=1,
                             batch_size=batch)
    prompts = ["rev abc=", "rev hello=", "rev xyz=", "rev pqrs="]
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(p, {"until": ["\n\n"], "max_gen_toks": 6}), idx=i)
            for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    assert got == [server["bundle"].generate(p, "b", max_new_tokens=6)[0] for p in prompts]


def test_vllm_prompt_and_output_settings(server):
    """vLLM's include_stop_str_in_output (streamed or not), allowed_token_ids, truncate_prompt_tokens and
    skip_special_tokens, as the library computes them; bad values are 400s that name the field."""
    c, b = server["client"], server["bundle"]
    tok = b.tokenizer("a")
    ids = b.encode("rev hello=", "a", chat=False)
    full = b.generate_ids([ids], ["a"], max_new_tokens=16)[0]
    stop = tok.decode(full.new_ids[4:7])
    kw = {"model": "a", "prompt": "rev hello=", "max_tokens": 16, "stop": [stop],
          "extra_body": {"include_stop_str_in_output": True}}
    r = c.completions.create(**kw)
    streamed = "".join(e.choices[0].text for e in c.completions.create(**kw, stream=True) if e.choices)
    assert r.choices[0].text == streamed == full.text[:full.text.index(stop) + len(stop)]
    allowed = tok.convert_tokens_to_ids(["a", "b"])
    r = c.completions.create(model="a", prompt="rev hello=", max_tokens=8, extra_body={"allowed_token_ids": allowed})
    assert set(r.choices[0].text) <= {"a", "b"} and r.usage.completion_tokens == 8  # end of text is not allowed
    assert r.choices[0].finish_reason == "length"
    long = "key zz=" * 3 + "rev hello="
    r = c.completions.create(model="a", prompt=long, max_tokens=6, extra_body={"truncate_prompt_tokens": 5})
    last = b.generate_ids([b.encode(long, "a", chat=False)[-5:]], ["a"], max_new_tokens=6)[0]
    assert (r.choices[0].text, r.usage.prompt_tokens) == (last.text, 5)
    bos = {str(tok.bos_token_id): 100.0}  # special tokens only: text only with skip_special_tokens=false
    for skip, text in ((True, ""), (False, tok.bos_token * 3)):
        kw = {"model": "a", "prompt": "rev hello=", "max_tokens": 3, "logit_bias": bos,
              "extra_body": {"skip_special_tokens": skip}}
        streamed = "".join(e.choices[0].text for e in c.completions.create(**kw, stream=True) if e.choices)
        assert c.completions.create(**kw).choices[0].text == streamed == text
    for extra, field in (({"allowed_token_ids": [999]}, "allowed_token_ids"), ({"allowed_token_ids": []}, "allowed"),
                         ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="a", prompt="rev a=", max_tokens=2, extra_body=extra)
        assert field in str(e.value.body), e.value.body


def test_a_stage_ends_at_its_stop_strings(server):
    """A pipeline stage's ``stop`` ends its rows' generation there, in process and through the server: the
    tokens counted are those up to the stop, and the answer is the text before it."""
    from branchmerge.staged import run_pipeline

    bundle = server["bundle"]
    full = run_pipeline(bundle, PipelinesConfig.model_validate({"pipelines": [{"name": "s", "stages": [
        {"branch": "a", "max_tokens": 16, "chat": False}]}]}).get("s"), ["rev hello="])[0][0]
    assert full.completion_tokens == 16
    stop = full.text[4:7]
    cfg = PipelinesConfig.model_validate({"pipelines": [{"name": "s", "stages": [
        {"branch": "a", "max_tokens": 16, "chat": False, "stop": [stop]}]}]})
    got = run_pipeline(bundle, cfg.get("s"), ["rev hello="])[0][0]
    assert got.text == full.text[:full.text.index(stop)].strip() and got.completion_tokens < 16
    with serving(create_app(bundle, pipelines=cfg)) as url:
        r = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
            model="s", prompt="rev hello=")
    assert r.choices[0].text == got.text and r.usage.completion_tokens == got.completion_tokens


def test_stage_extract_and_plain_completion(server):
    from branchmerge.staged import Pipeline, run_pipeline

    bundle = server["bundle"]
    p = Pipeline.model_validate({"name": "x", "stages": [
        {"branch": "a", "user": "{question}", "max_tokens": 6},
        {"branch": "b", "user": "{previous}", "max_tokens": 6, "chat": False, "extract": "([a-z])"},
    ]})
    res = run_pipeline(bundle, p, ["add 1+2="])[0]
    raw = bundle.generate(res[0].text, "b", max_new_tokens=6)[0].strip()
    import re

    m = re.search("([a-z])", raw)
    assert res[1].text == (m.group(1) if m else raw)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Pipeline.model_validate({"name": "y", "stages": [{"extract": "(["}]})


def test_a_runaway_extract_regex_is_stopped(server):
    """A stage's ``extract`` pattern that backtracks for ever stops after its time limit: a 500 naming the
    pattern (the operator's config, not the request), and the server goes on answering."""
    from branchmerge.staged import EXTRACT_TIMEOUT_S, ExtractTimeoutError, bundle_pipelines, run_pipeline

    c, bundle = server["client"], server["bundle"]
    raw = bundle.generate("rev abcdefghij=", "b", max_new_tokens=40, chat=False)[0]
    assert sum(ch.isalnum() for ch in raw) >= 25  # long enough to stall the pattern for hours (2^n steps)
    t = time.monotonic()
    with pytest.raises(openai.InternalServerError, match="ran past") as e:
        c.chat.completions.create(model="runaway", messages=[{"role": "user", "content": "rev abcdefghij="}])
    assert e.value.body["code"] == "extract_timeout" and time.monotonic() - t < 10 * EXTRACT_TIMEOUT_S
    assert c.completions.create(model="b", prompt="rev abc=", max_tokens=3).choices[0].text is not None
    with pytest.raises(ExtractTimeoutError, match=r"p\{Han\}"):
        run_pipeline(bundle, bundle_pipelines(bundle).get("runaway"), ["rev abcdefghij="])


def test_logprobs_and_echo_match_library(server):
    """``echo`` + ``logprobs`` (OpenAI's legacy completions) return each prompt token's log-probability
    under the chosen branch, equal to the library's; token-id prompts work; bad ids are refused."""
    b, c = server["bundle"], server["client"]
    ids = b.tokenizer("b")("rev hello=")["input_ids"]
    ref = b.token_logprobs(ids, "b", top=2)
    r = c.completions.create(model="b", prompt="rev hello=", max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "rev hello=" and lp.tokens == list("rev hello=")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(ref.logprobs[1:], abs=1e-5)
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    # token ids in, one greedy token out, scored like its prompt
    r2 = c.completions.create(model="b", prompt=ids, max_tokens=1, echo=True, logprobs=1)
    greedy = b.generate("rev hello=", "b", max_new_tokens=1)[0]
    assert r2.choices[0].text == b.tokenizer("b").decode(ids) + greedy
    assert len(r2.choices[0].logprobs.tokens) == len(ids) + 1
    assert r2.choices[0].logprobs.token_logprobs[-1] == pytest.approx(max(r2.choices[0].logprobs.top_logprobs[-1].values()))
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.completions.create(model="b", prompt=[1, 99999], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="echo is not supported with stream"):
        c.completions.create(model="b", prompt="rev a=", max_tokens=2, logprobs=1, echo=True, stream=True)
    with pytest.raises(openai.BadRequestError, match="0 only with echo"):
        c.completions.create(model="b", prompt="rev a=", max_tokens=0, logprobs=1)


def test_chat_logprobs_score_the_answer(server):
    """Chat ``logprobs``/``top_logprobs`` (OpenAI's form): each answer token's log-probability under the
    branch, the library's; each choice of ``n`` its own; refused where they cannot be given."""
    b, c = server["bundle"], server["client"]
    msgs = [{"role": "user", "content": "rev hello="}]
    r = c.chat.completions.create(model="b", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=3, n=2,
                                  temperature=1.0, seed=5)
    ids = b.encode_messages(msgs, "b")
    tok = b.tokenizer("b")
    for ch in r.choices:
        content = ch.logprobs.content
        new = [tok.convert_tokens_to_ids(e.token) for e in content]  # (a character tokenizer: token = text)
        assert "".join(e.token for e in content) == ch.message.content and len(new) == 6
        ref = b.token_logprobs(ids + new, "b", top=3)
        assert [e.logprob for e in content] == pytest.approx(ref.logprobs[len(ids):], abs=1e-5)
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
        assert all(e.bytes == list(e.token.encode()) for e in content)
    plain = c.chat.completions.create(model="b", messages=msgs, max_tokens=6)
    assert plain.choices[0].logprobs is None
    for kw, param in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "model": "two_step"}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**{"model": "b", "messages": msgs, "max_tokens": 3, **kw})
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="b", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=21)


def test_logprobs_stream_with_their_tokens(server):
    """Streamed chat and completions carry each chunk's tokens' logprobs (vLLM's form): together the chat
    ones equal the answer's unstreamed logprobs and the completion ones equal its scored ones (one pass over
    prompt and answer), with ``text_offset`` counting the text sent; a stop string's tokens are not sent."""
    c = server["client"]
    msgs = [{"role": "user", "content": "rev hello="}]
    whole = c.chat.completions.create(model="b", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=2)
    chunks = [ch.choices[0] for ch in c.chat.completions.create(model="b", messages=msgs, max_tokens=8, logprobs=True,
                                                                 top_logprobs=2, stream=True) if ch.choices]
    got = [e for ch in chunks if ch.logprobs for e in ch.logprobs.content]
    assert "".join(ch.delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert [e.token for e in got] == [e.token for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in got)
    assert all(ch.logprobs is None for ch in chunks if not ch.delta.content)  # (the role and finish chunks)
    scored = c.completions.create(model="a", prompt="add 12+34=", max_tokens=6, logprobs=2).choices[0]
    parts = [ch.choices[0] for ch in c.completions.create(model="a", prompt="add 12+34=", max_tokens=6, logprobs=2,
                                                           stream=True) if ch.choices]
    tokens = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
    assert "".join(p.text for p in parts) == scored.text and tokens == scored.logprobs.tokens
    assert [v for p in parts if p.logprobs for v in p.logprobs.token_logprobs] == \
        pytest.approx(scored.logprobs.token_logprobs, abs=1e-4)
    assert [o for p in parts if p.logprobs for o in p.logprobs.text_offset] == scored.logprobs.text_offset
    # a stop string: the text before it, and only its tokens' logprobs
    text = scored.text
    cut = [ch.choices[0] for ch in c.completions.create(model="a", prompt="add 12+34=", max_tokens=6, logprobs=0,
                                                         stop=[text[2:4]], stream=True) if ch.choices]
    assert "".join(p.text for p in cut) == text[:2]
    assert "".join(t for p in cut if p.logprobs for t in p.logprobs.tokens) == text[:2]


def test_prompt_logprobs_as_vllm_gives_them(server):
    """vLLM's ``prompt_logprobs``: per prompt token (None first) its log-probability and rank under the branch,
    with the likeliest tokens at its position, keyed by token id; on completions (with or without
    ``logprobs``) and on chat (the prompt its template renders); refused streamed, on pipelines and past 20."""
    b, c = server["bundle"], server["client"]
    tok = b.tokenizer("b")
    ids = tok("rev hello=")["input_ids"]
    ref = b.token_logprobs(ids, "b", top=3)
    r = c.completions.create(model="b", prompt="rev hello=", max_tokens=3, extra_body={"prompt_logprobs": 3})
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert r.choices[0].text == b.generate("rev hello=", "b", max_new_tokens=3)[0] and r.choices[0].logprobs is None
    assert len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        own = got[p][str(ids[p])]
        assert own["logprob"] == pytest.approx(ref.logprobs[p], abs=1e-4) and own["decoded_token"] == tok.decode([ids[p]])
        tops = [(int(i), e["logprob"], e["rank"]) for i, e in got[p].items() if e["rank"] <= 3 and int(i) != ids[p]]
        ranked = {i: r for r, (i, _) in enumerate(ref.top[p], 1)}
        assert own["rank"] == ranked.get(ids[p], own["rank"]) and own["rank"] >= 1
        assert all(ranked[i] == rank for i, _, rank in tops) and len(got[p]) in (3, 4)
        assert (own["rank"] <= 3) == (ids[p] in ranked)
    both = c.completions.create(model="b", prompt="rev hello=", max_tokens=2, logprobs=1,
                                extra_body={"prompt_logprobs": 0}).choices[0]
    assert all(len(t) == 1 for t in both.logprobs.top_logprobs) and all(len(d) == 1 for d in both.prompt_logprobs[1:])
    msgs = [{"role": "user", "content": "rev abc="}]
    chat = c.chat.completions.create(model="b", messages=msgs, max_tokens=3, extra_body={"prompt_logprobs": 1})
    cids = b.encode_messages(msgs, "b")
    cref = b.token_logprobs(cids, "b")
    assert [d and d[str(t)]["logprob"] for d, t in zip(chat.model_extra["prompt_logprobs"], cids)] == \
        pytest.approx([None, *cref.logprobs[1:]], abs=1e-4)
    for call, param in [(lambda: c.completions.create(model="b", prompt="x=", max_tokens=2, stream=True,
                                                      extra_body={"prompt_logprobs": 1}), "stream"),
                        (lambda: c.chat.completions.create(model="b", messages=msgs, max_tokens=2, stream=True,
                                                           extra_body={"prompt_logprobs": 1}), "stream"),
                        (lambda: c.chat.completions.create(model="two_step", messages=msgs, max_tokens=2,
                                                           extra_body={"prompt_logprobs": 1}), "prompt_logprobs"),
                        (lambda: c.completions.create(model="b", prompt="x=", max_tokens=2,
                                                      extra_body={"prompt_logprobs": 21}), "prompt_logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert param in (e.value.body.get("param") or e.value.message), e.value.body


def test_bad_words_are_never_written(server):
    """vLLM's ``bad_words`` through the API: the answer never holds the word the plain answer holds;
    an empty word or more than 64 are refused."""
    c = server["client"]
    plain = c.completions.create(model="a", prompt="rev hello=", max_tokens=20).choices[0].text
    word = plain[2:4]
    got = c.completions.create(model="a", prompt="rev hello=", max_tokens=20, extra_body={"bad_words": [word]})
    assert word in plain and word not in got.choices[0].text
    assert got.choices[0].text[:2] == plain[:2]
    for bad in ([" "], ["x"] * 65, [""]):
        with pytest.raises(openai.BadRequestError, match="bad"):
            c.completions.create(model="a", prompt="rev hello=", max_tokens=3, extra_body={"bad_words": bad})


@pytest.mark.parametrize("batch", [1, 3])
def test_lm_eval_client_loglikelihood(server, monkeypatch, batch):
    """lm-evaluation-harness's completions client scores (context, continuation) pairs through the
    server, tokenizing locally with the branch's own tokenizer: the loglikelihood task type (MMLU-style),
    one pair per request or several (a shared context then runs once)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    b = server["bundle"]
    lm = LocalCompletionsAPI(base_url=server["url"] + "/v1/completions", model="a", tokenizer_backend="huggingface",
                             tokenizer=str(b.reader.branch_dir("a")), num_concurrent=2, max_retries=1,
                             batch_size=batch)
    pairs = [("add 1+2=", "3"), ("add 1+2=", "12"), ("add 5+5=", "10")]
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    tok = b.tokenizer("a")
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ci, xi = tok(ctx)["input_ids"], tok(cont)["input_ids"]
        sc = b.token_logprobs(ci + xi, "a", top=1)
        assert ll == pytest.approx(sum(sc.logprobs[len(ci):]), abs=1e-4)
        assert greedy == all(t[0][0] == x for t, x in zip(sc.top[len(ci):], xi))


def test_echo_scores_the_stop_token(server):
    """A completion that ends on the end-of-sequence token still scores it (as vLLM does), so
    lm-evaluation-harness's ``token_logprobs[ctxlen:-1]`` covers exactly the continuation."""
    b, c = server["bundle"], server["client"]
    tok = b.tokenizer("b")
    ids = tok("rev abc=")["input_ids"]
    greedy = int(b.logits(torch.tensor([ids]), ["b"])[0, -1].argmax())
    old = tok.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(greedy)  # the next token is now the end of the sequence
    try:  # one greedy token: one scoring pass; three tokens: the batching engine, then a scoring pass
        rs = [c.completions.create(model="b", prompt=ids, max_tokens=mt, echo=True, logprobs=1) for mt in (1, 3)]
    finally:
        tok.eos_token = old
    for r in rs:
        lp = r.choices[0].logprobs
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text == tok.decode(ids)
        assert len(lp.token_logprobs) == len(ids) + 1
        assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))
    one, three = (r.choices[0].logprobs.token_logprobs for r in rs)
    assert one[1:] == pytest.approx(three[1:], abs=1e-5)  # both paths score the same tokens alike


def test_concurrent_scoring_requests_are_batched(server):
    """Concurrent echo/logprobs requests (lm_eval's loglikelihood traffic) share right-padded
    mixed-branch forwards and still equal one-at-a-time scoring."""
    c, bundle, engine = server["client"], server["bundle"], server["app"].state.engine
    prompts = [("add 1+1=", "a"), ("rev abcdef=", "b"), ("key z=", "c"), ("add 13+4=", "a")] * 3
    expected = [bundle.token_logprobs(bundle.tokenizer(b)(p)["input_ids"], b, greedy_next=True).logprobs[1:]
                for p, b in prompts]
    before = engine.batches

    def call(pb):
        p, b = pb
        return c.completions.create(model=b, prompt=p, max_tokens=1, echo=True, logprobs=0).choices[0].logprobs

    with ThreadPoolExecutor(12) as ex:
        with engine.paused():
            futs = [ex.submit(call, pb) for pb in prompts]
            wait_queued(engine, len(prompts), futures=futs)
        got = [f.result() for f in futs]
    for lp, want in zip(got, expected):
        assert lp.token_logprobs[0] is None and lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert engine.batches - before == 1


def test_several_prompts_in_one_request(server):
    """OpenAI's batch form (a list of prompts, as lm_eval sends with ``batch_size``): one choice per
    prompt in order, each equal to its own single-prompt answer; usage is summed; scoring prompts that
    share a context go through the shared-prefix path and still equal one-at-a-time scoring."""
    c, b = server["client"], server["bundle"]
    texts = ["rev abc=", "dup xy=", "rev hello="]
    r = c.completions.create(model="b", prompt=texts, max_tokens=6)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [b.generate(t, "b", max_new_tokens=6)[0] for t in texts]
    assert r.usage.prompt_tokens == sum(len(b.tokenizer("b")(t)["input_ids"]) for t in texts)
    assert r.model_extra["branch"] == ["b", "b", "b"]
    raw = c.completions.with_raw_response.create(model="b", prompt=texts[:2], max_tokens=2)
    assert raw.headers["X-Branchmerge-Branch"] == "b"  # the distinct answering branches
    ctx = b.tokenizer("a")("add 12+34+56=")["input_ids"]
    ids = [ctx + [b.tokenizer("a").convert_tokens_to_ids(d)] for d in "0123"]
    s = c.completions.create(model="a", prompt=ids, max_tokens=1, echo=True, logprobs=1)
    for ch, seq in zip(s.choices, ids):
        want = b.token_logprobs(seq, "a", greedy_next=True).logprobs[1:]
        assert ch.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\] must not be empty"):
        c.completions.create(model="b", prompt=["rev a=", "  "], max_tokens=2)
    # streamed: every prompt's choice in one event stream, chunks tagged by index, the same texts
    parts: dict[int, str] = {}
    for ev in c.completions.create(model="b", prompt=texts, max_tokens=6, stream=True):
        for ch in ev.choices:
            parts[ch.index] = parts.get(ch.index, "") + ch.text
    assert parts == {i: ch.text for i, ch in enumerate(r.choices)}


def test_n_completions_per_prompt(server):
    """``n`` choices per prompt (OpenAI's ``n``): greedy ones equal the library's answer, sampled ones come
    back indexed; with several prompts, the choices run prompt by prompt; refused where unsupported."""
    c, b = server["client"], server["bundle"]
    want = b.generate("rev abc=", "b", max_new_tokens=5)[0]
    r = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "rev abc="}], max_tokens=5, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and {ch.message.content for ch in r.choices} == {want}
    new = b.generate_ids([b.encode("rev abc=", "b")], ["b"], max_new_tokens=5)[0].new_ids
    assert r.usage.completion_tokens == 3 * len(new) and r.usage.prompt_tokens == len(b.encode("rev abc=", "b"))
    s = c.completions.create(model="b", prompt=["rev abc=", "dup xy="], max_tokens=6, n=2, temperature=1.5, seed=1)
    assert [ch.index for ch in s.choices] == [0, 1, 2, 3]
    assert [ch.model_extra["branch"] for ch in s.choices] == ["b"] * 4
    assert s.usage.prompt_tokens == sum(len(b.tokenizer("b")(t)["input_ids"]) for t in ["rev abc=", "dup xy="])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.completions.create(model="b", prompt="rev a=", max_tokens=2, n=2, logprobs=1)
    # streamed chat with n=2: two choices, each the greedy answer, each ending with a finish reason
    got: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for ev in c.chat.completions.create(model="b", messages=[{"role": "user", "content": "rev abc="}], max_tokens=5,
                                        n=2, stream=True):
        for ch in ev.choices:
            got[ch.index] = got.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert got == {0: want, 1: want} and set(reasons) == {0, 1}
    with pytest.raises(openai.BadRequestError, match="pipeline"):
        c.completions.create(model="two_step", prompt="add 1+2=", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="n"):
        c.completions.create(model="b", prompt="rev a=", max_tokens=2, n=0)


def test_lm_eval_with_model_auto(server, monkeypatch):
    """lm_eval's completions client with ``model=auto`` and its default token-id requests: the server reads
    the ids with the tokenizer all branches share, routes each request, and scores on the routed branch."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    b = server["bundle"]
    lm = LocalCompletionsAPI(base_url=server["url"] + "/v1/completions", model="auto",
                             tokenizer_backend="huggingface", tokenizer=str(b.reader.branch_dir("a")),
                             num_concurrent=1, max_retries=1, batch_size=1)
    pairs = [("rev hello=", "olleh"), ("add 5+5=", "10")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)], disable_tqdm=True)
    tok = b.tokenizer("a")
    routed = []
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ci, xi = tok(ctx)["input_ids"], tok(cont)["input_ids"]
        # what the server routed: the request's ids read with the shared tokenizer
        routed.append(b.router.route([tok.decode(ci + xi, skip_special_tokens=True)])[0])
        assert ll == pytest.approx(sum(b.token_logprobs(ci + xi, routed[-1]).logprobs[len(ci):]), abs=1e-4)
    assert len(set(routed)) == 2  # two branches answered


def test_mixed_concurrent_load_is_all_answered_and_consistent(server):
    """Ten clients for a few seconds, each request of a random kind: routed chat, sampled and greedy
    completions, scoring with echo, streams, pipelines, seeded samples, several prompts with n=2, and
    /metrics. Every answer is a 200; a greedy answer equals the library's; a seeded one is the same text
    every time (a race on shared state, such as the router's tokenizer, showed up only under such load)."""
    import random
    from collections import Counter, defaultdict

    url, bundle = server["url"], server["bundle"]
    words = ["add 3+4=", "rev qwerty=", "key mm=", "add 9+9=", "rev zz=", "key abc="]
    greedy = {w: bundle.generate(w, "a", max_new_tokens=5, chat=False)[0] for w in words}
    bad, seeded, kinds = Counter(), defaultdict(set), Counter()
    stop = time.monotonic() + 6

    def client(i: int) -> None:
        rnd = random.Random(i)
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            while time.monotonic() < stop:
                kind, w = rnd.choice(["auto", "sampled", "greedy", "score", "stream", "pipe", "seeded", "multi",
                                      "metrics"]), rnd.choice(words)
                chat = {"model": "auto", "messages": [{"role": "user", "content": w + "x" * rnd.randint(0, 9)}],
                        "max_tokens": 4}
                v = rnd.choice([x for x in words if not x.startswith("key")])
                body = {"auto": ("/v1/chat/completions", chat),
                        "sampled": ("/v1/completions", {"model": rnd.choice("abc"), "prompt": w, "max_tokens": 6,
                                                        "temperature": rnd.choice([0.5, 1.5]), "top_p": 0.8}),
                        "greedy": ("/v1/completions", {"model": "a", "prompt": w, "max_tokens": 5}),
                        # `auto` for "key" questions goes to pipeline two_step (routes: c), which neither scores
                        # nor gives n=2: those requests ask about the other questions
                        "score": ("/v1/completions", {"model": rnd.choice(["a", "auto"]), "prompt": [v + " A", v + " B"],
                                                      "max_tokens": 1, "echo": True, "logprobs": 1}),
                        "stream": ("/v1/completions", {"model": "auto", "prompt": w, "max_tokens": 5, "stream": True}),
                        "pipe": ("/v1/chat/completions", {**chat, "model": "two_step"}),
                        "seeded": ("/v1/completions", {"model": "b", "prompt": words[i % 6], "max_tokens": 8,
                                                       "temperature": 1.3, "seed": 42}),
                        "multi": ("/v1/completions", {"model": "auto", "prompt": [v, rnd.choice(words[:2])], "n": 2,
                                                      "max_tokens": 3, "temperature": 0.9}),
                        "metrics": ("/metrics", None)}[kind]
                r = c.get(url + body[0]) if body[1] is None else c.post(url + body[0], json=body[1])
                kinds[kind] += 1
                if r.status_code != 200 or (kind == "stream" and "[DONE]" not in r.text):
                    bad[(kind, r.status_code, r.text[:100])] += 1
                elif kind == "greedy" and r.json()["choices"][0]["text"] != greedy[w]:
                    bad[(kind, "differs", w)] += 1
                elif kind == "seeded":
                    seeded[words[i % 6]].add(r.json()["choices"][0]["text"])

    with ThreadPoolExecutor(10) as ex:
        list(ex.map(client, range(10)))
    assert not bad, bad
    assert len(kinds) == 9 and sum(kinds.values()) > 50, kinds
    assert seeded and all(len(v) == 1 for v in seeded.values()), seeded


def test_tokenize_and_detokenize_as_vllm(server):
    """vLLM's ``/tokenize`` (a prompt, or a conversation through the branch's chat template; ``auto`` gives the
    routed branch's) and ``/detokenize``: the library's token ids and text; bad input is a 400 naming it."""
    b, url = server["bundle"], server["url"]
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/tokenize", headers=h, json={"model": "b", "prompt": "rev hello=", "return_token_strs": True})
    tok = b.tokenizer("b")
    assert r.status_code == 200 and r.json()["tokens"] == tok("rev hello=")["input_ids"]
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["token_strs"] == list("rev hello=")
    assert r.json()["max_model_len"] == b.context_limit("b")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev hello="}]
    r = httpx.post(url + "/tokenize", headers=h, json={"model": "auto", "messages": msgs})
    assert r.json()["branch"] == "b" and r.json()["tokens"] == b.encode_messages(msgs, "b")
    back = httpx.post(url + "/detokenize", headers=h, json={"model": "a", "tokens": r.json()["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == b.tokenizer("a").decode(r.json()["tokens"])
    assert httpx.post(url + "/tokenize", json={"model": "b", "prompt": "x"}).status_code == 401  # the API key
    for path, body, param in [
        ("/tokenize", {"model": "b"}, "prompt"),
        ("/tokenize", {"model": "b", "prompt": "x", "messages": msgs}, "prompt"),
        ("/tokenize", {"model": "two_step", "prompt": "x"}, "model"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, "model"),
        ("/tokenize", {"model": "b", "messages": msgs, "chat_template_kwargs": {"tokenize": 1}}, "chat_template_kwargs"),
        ("/tokenize", {"model": "b", "messages": msgs, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"model": "b", "prompt": "x", "truncate": 3}, "truncate"),
        ("/tokenize", {"model": "b", "prompt": "x" * 2_000_000}, "prompt"),
        ("/detokenize", {"model": "b", "tokens": [1, 10 ** 6]}, "tokens"),
        ("/detokenize", {"model": "b", "tokens": [-1]}, "tokens"),
        ("/detokenize", {"model": "auto", "tokens": [1]}, "model"),
        ("/detokenize", {"model": "b", "tokens": "abc"}, "tokens"),
    ]:
        r = httpx.post(url + path, headers=h, json=body)
        assert r.status_code in (400, 404, 413) and (r.status_code == 413 or r.json()["error"]["param"] == param), \
            (path, body, r.text[:300])


def test_beam_search_as_vllm(server, bundles, family):
    """vLLM's ``use_beam_search``: ``n`` beams, the ``n`` best answers best first, equal to transformers' beam
    search on the original model (r=0) and to the library's on the served bundle; sampling settings, stop
    strings, structures, streams and scoring are refused with it, by name."""
    import torch

    b0 = branchmerge.load(bundles[0.0])
    ids = b0.encode("rev hello=", "a")
    model = family["a"][1]
    x = torch.tensor([ids])
    ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, num_beams=3,
                         num_return_sequences=3, early_stopping=True, do_sample=False, length_penalty=0.5,
                         pad_token_id=0, eos_token_id=sorted(b0.stop_ids("a")))
    got = b0.beam_search(ids, "a", beams=3, max_new_tokens=8, length_penalty=0.5)
    eos = b0.stop_ids("a")
    want = [[t for t in row[len(ids):]] for row in ref.tolist()]
    want = [row[:next((i for i, t in enumerate(row) if t in eos), len(row))] for row in want]
    assert [g.new_ids for g in got] == want and len({tuple(w) for w in want}) == 3
    c, b = server["client"], server["bundle"]
    beams = b.beam_search(b.encode("rev hello=", "b"), "b", beams=4, max_new_tokens=6)
    r = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "rev hello="}], max_tokens=6, n=4,
                                  extra_body={"use_beam_search": True})
    assert [ch.message.content for ch in r.choices] == [g.text for g in beams]
    assert [ch.finish_reason for ch in r.choices] == [g.finish_reason for g in beams]
    assert r.usage.completion_tokens == sum(len(g.new_ids) for g in beams)
    t = c.completions.create(model="b", prompt=["rev hello=", "add 1+1="], max_tokens=6, n=2,
                             extra_body={"use_beam_search": True, "length_penalty": 0.0})
    assert len(t.choices) == 4 and t.choices[0].text == b.beam_search(
        b.tokenizer("b")("rev hello=")["input_ids"], "b", beams=2, max_new_tokens=6, length_penalty=0.0)[0].text
    for extra, param in [({"temperature": 0.8}, "temperature"), ({"stop": ["x"]}, "stop"),
                         ({"presence_penalty": 0.5}, "presence_penalty"), ({"stream": True}, "stream"),
                         ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs.regex"),
                         ({"length_penalty": 99}, "length_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="b", prompt="rev a=", max_tokens=4, n=2,
                                 extra_body={"use_beam_search": True, **extra})
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError, match="use_beam_search"):
        c.completions.create(model="b", prompt="rev a=", max_tokens=2, logprobs=1, extra_body={"use_beam_search": True})
