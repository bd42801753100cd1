"""`branchmerge run-batch` (vLLM's run_batch): a JSONL file of OpenAI requests answered offline, each output
line what the HTTP server answers for that request (compared with a real server through the openai SDK),
in input order; lines that are not requests named; at most --max-in-flight requests at once; the output
written whole or not at all."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

import branchmerge
from branchmerge.front import front_for
from branchmerge.server import ServerLimits, create_app
from branchmerge.server.api import OpenAIService
from branchmerge.server.batch import BatchRunner, run_batch_file
from tests.cli_util import run_cli
from tests.serving import serving

CHAT = {"model": "a", "messages": [{"role": "user", "content": "rev abc="}], "max_tokens": 5, "temperature": 0}
COMPLETION = {"model": "b", "prompt": "dup ab=", "max_tokens": 4, "temperature": 0}
RESPONSE = {"model": "c", "input": "rev xy=", "max_output_tokens": 4, "temperature": 0}


def _line(cid, url, body, **kw) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **kw})


def test_a_batch_file_is_answered_as_the_server_answers(bundles, tmp_path):
    lines = [_line("chat-1", "/v1/chat/completions", CHAT), _line("cmpl-1", "/v1/completions", COMPLETION),
             "", _line("resp-1", "/v1/responses", RESPONSE),
             _line("too-long", "/v1/chat/completions", {**CHAT, "max_tokens": 10 ** 6}),
             _line("streamed", "/v1/completions", {**COMPLETION, "stream": True}),
             _line("no-model", "/v1/chat/completions", {"messages": CHAT["messages"]}),
             "{not json", _line("x", "/v1/embeddings", {"model": "a", "input": "hi"}),
             _line("chat-1", "/v1/completions", COMPLETION), json.dumps({"custom_id": "y", "url": "/v1/completions",
                                                                         "body": COMPLETION, "extra": 1}),
             _line("get", "/v1/completions", COMPLETION, method="GET"), "[1, 2]", "[" * 100_000 + "]" * 100_000,
             _line("chat-2", "/v1/chat/completions", {**CHAT, "model": "b"})]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    b = branchmerge.load(bundles[0.9], dtype="float32")
    counts = run_batch_file(front_for(b), src, out, progress=False)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert counts == {"lines": 14, "succeeded": 4, "failed": 10} and len(recs) == 14
    assert [r["custom_id"] for r in recs] == ["chat-1", "cmpl-1", "resp-1", "too-long", "streamed", "no-model", None,
                                              "x", "chat-1", "y", "get", None, None, "chat-2"]
    assert len({r["id"] for r in recs}) == 14 and all(r["id"].startswith("batch_req_") for r in recs)
    with serving(create_app(b, max_batch=4, wait_ms=5)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        want = [c.chat.completions.create(**CHAT).choices[0].message.content,
                c.completions.create(**COMPLETION).choices[0].text, c.responses.create(**RESPONSE).output_text,
                c.chat.completions.create(**{**CHAT, "model": "b"}).choices[0].message.content]
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(**{**CHAT, "max_tokens": 10 ** 6})
    ok = {r["custom_id"]: r["response"]["body"] for r in recs if r["response"] and r["response"]["status_code"] == 200}
    assert [ok["chat-1"]["choices"][0]["message"]["content"], ok["cmpl-1"]["choices"][0]["text"],
            ok["resp-1"]["output"][0]["content"][0]["text"], ok["chat-2"]["choices"][0]["message"]["content"]] == want
    assert ok["chat-1"]["branch"] == "a" and ok["resp-1"]["object"] == "response"
    by = {i: r for i, r in enumerate(recs)}
    assert by[3]["response"]["status_code"] == 400 and by[3]["response"]["body"]["error"] == refused.value.body
    assert "stream is not supported in a batch" in by[4]["response"]["body"]["error"]["message"]
    assert by[5]["response"]["status_code"] == 400 and by[5]["response"]["body"]["error"]["param"] == "model"
    errors = {i: r["error"] for i, r in by.items() if r["response"] is None}
    assert {i: e["code"] for i, e in errors.items()} == {6: "invalid_json", 7: "invalid_url", 8: "duplicate_custom_id",
                                                          9: "invalid_request", 10: "invalid_method", 11: "invalid_request",
                                                          12: "invalid_json"}
    assert errors[6]["message"].startswith("line 8 is not valid JSON")  # (line numbers count the blank line)
    assert errors[12]["message"] == "line 14 nests too deeply to read"
    assert "'/v1/embeddings' is not one of" in errors[7]["message"] and "unknown field 'extra'" in errors[9]["message"]


def test_at_most_max_in_flight_requests_wait_at_once(bundles):
    """With the engine paused, a 10-line batch has 3 jobs queued and no more (--max-in-flight 3); once it runs,
    every line is answered, in order."""
    svc = OpenAIService(front_for(branchmerge.load(bundles[0.9], dtype="float32")), max_batch=4)
    runner = BatchRunner(svc)
    lines = [_line(f"r{i}", "/v1/completions", {**COMPLETION, "prompt": f"rev {'ab'[i % 2] * (1 + i)}="})
             for i in range(10)]

    async def go():
        recs = []

        async def consume():
            async for r in runner.run(lines, max_in_flight=3):
                recs.append(r)

        with svc.engine.paused():
            task = asyncio.ensure_future(consume())
            for _ in range(400):
                await asyncio.sleep(0.01)
                if svc.engine.queued() >= 3:
                    break
            await asyncio.sleep(0.3)
            most = svc.engine.queued()
        await task
        return most, recs

    most, recs = asyncio.run(go())
    assert most == 3 and [r["custom_id"] for r in recs] == [f"r{i}" for i in range(10)]
    assert all(r["response"]["status_code"] == 200 for r in recs)


def test_the_run_batch_command(bundles, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(_line("one", "/v1/chat/completions", CHAT) + "\n" + _line("two", "/v1/responses", RESPONSE) + "\n")
    code, stdout, err = run_cli(capsys, "run-batch", bundles[0.9], "-i", src, "-o", out, "--max-tokens-limit", "64")
    assert code == 0, err
    assert "2 requests, 2 succeeded, 0 failed" in stdout and len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    # the input as output, a folder as output, a missing input, input that is not UTF-8: named, nothing written
    code, _, err = run_cli(capsys, "run-batch", bundles[0.9], "-i", src, "-o", src)
    assert code != 0 and "is the input file" in err
    code, _, err = run_cli(capsys, "run-batch", bundles[0.9], "-i", src, "-o", tmp_path)
    assert code != 0 and "is a folder" in err
    code, _, err = run_cli(capsys, "run-batch", bundles[0.9], "-i", tmp_path / "nope.jsonl", "-o", out)
    assert code != 0 and "nope.jsonl is not a file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_line("one", "/v1/completions", COMPLETION).encode() + b"\n\xff\xfe\n")
    code, _, err = run_cli(capsys, "run-batch", bundles[0.9], "-i", bad, "-o", tmp_path / "bad-out.jsonl")
    assert code != 0 and "bad.jsonl is not UTF-8 text" in err and not (tmp_path / "bad-out.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "in.jsonl", "out.jsonl"]  # no temporary file


def test_limits_apply_to_each_line(bundles, tmp_path):
    """A line past the server's prompt limit is that line's 400, not the batch's failure."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(_line("big", "/v1/completions", {**COMPLETION, "prompt": "x" * 200}) + "\n"
                   + _line("ok", "/v1/completions", COMPLETION) + "\n")
    b = branchmerge.load(bundles[0.9], dtype="float32")
    counts = run_batch_file(front_for(b), src, out, limits=ServerLimits(max_prompt_chars=100), progress=False)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert counts["failed"] == 1 and recs[0]["response"]["status_code"] == 400
    assert "at most 100" in recs[0]["response"]["body"]["error"]["message"]
    assert recs[1]["response"]["status_code"] == 200
