"""The serving engine on its own (no HTTP): continuous batching, jobs joining and leaving a running batch."""

from __future__ import annotations

import time

import pytest

from branchmerge.runtime.sampling import RowSampler, RowSettings
from branchmerge.server.engine import Engine, Job
from tests.serving import forwards


def _alone(bundle, job: Job):
    return bundle.generate_ids([job.ids], [job.branch], max_new_tokens=job.max_tokens, stop=[job.stop],
                               row_sampler=RowSampler([job.sampling]))[0]


def _started(engine: Engine, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while engine.running == 0:
        assert time.monotonic() < end, "the engine did not start the batch"
        time.sleep(0.001)


def test_short_jobs_join_a_long_one_and_leave_before_it(loaded):
    """Jobs that arrive while a long answer runs join its batch at the next segment and are answered when
    they end, not when it does; every answer is the one the job gets alone (greedy, seeded with penalties,
    a stop string), the long one's too."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    engine = Engine(b, max_batch=4, wait_ms=0, min_segment=2)
    stop = _alone(b, Job(tok.encode("add 12+30="), "c", 12)).text[3:5]
    with forwards(b.model("a")) as seen:
        long = engine.submit(Job(tok.encode("rev hello="), "a", 100, sampling=RowSettings(ignore_eos=True)))
        _started(engine)
        shorts = engine.submit_many([
            Job(tok.encode("add 5+5="), "a", 5),
            Job(tok.encode("key zz="), "b", 6, sampling=RowSettings(temperature=0.8, seed=3, presence_penalty=0.5)),
            Job(tok.encode("add 12+30="), "c", 12, stop=[stop])])
        for j in shorts:
            assert j.finished.wait(60)
        assert not long.finished.is_set()  # answered while the long one still runs
        assert long.finished.wait(120)
    assert engine.batches == 1 and engine.segments >= 3
    # each prompt is prefilled once: the rows going on keep their KV cache from one segment to the next
    prefilled = sum(rows * width for rows, width in seen if width > 1)
    assert prefilled <= len(long.ids) + 3 * max(len(j.ids) for j in shorts)
    assert engine.reused_tokens >= len(long.ids) + 2  # at least the long row's text, once (/metrics reads it)
    for j in [long, *shorts]:
        ref = _alone(b, j)
        assert (j.error, j.new_ids, j.stop_id) == (None, ref.new_ids, ref.stop_id)
    assert len(long.new_ids) == 100 and len(shorts[2].new_ids) < 12  # it ended at its stop string


def test_no_job_joins_while_others_wait_for_their_turn(loaded):
    """With a job of another kind waiting (scoring here), a running batch takes no one in: it ends, the
    waiting job runs, then the generation that arrived after it (round-robin, as without joining)."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    engine = Engine(b, max_batch=4, wait_ms=0, min_segment=2)
    order: list[str] = []

    def watch(job: Job, name: str) -> Job:
        finish = job._finish
        job._finish = lambda: (order.append(name), finish())
        return job

    long = engine.submit(watch(Job(tok.encode("rev hello="), "a", 60, sampling=RowSettings(ignore_eos=True)), "long"))
    _started(engine)
    engine.submit(watch(Job(tok.encode("add 1+2=3"), "a", 0, score=(0, False)), "score"))
    short = engine.submit(watch(Job(tok.encode("add 5+5="), "a", 4), "short"))
    assert short.finished.wait(120) and long.finished.is_set()
    assert order == ["long", "score", "short"] and engine.batches == 3
    assert short.new_ids == _alone(b, short).new_ids


def test_a_waiting_job_that_does_not_fit_does_not_break_segments(loaded):
    """A job that would not fit the running batch's context waits for it without making every segment end
    (each would prefill the batch again for nothing); it runs when the batch ends, with its own answer."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    engine = Engine(b, max_batch=4, wait_ms=0, min_segment=2)
    ids = tok.encode("rev hello=")
    long = engine.submit(Job(ids, "a", 100, sampling=RowSettings(ignore_eos=True)))
    _started(engine)
    big = engine.submit(Job(ids, "a", 128 - len(ids), sampling=RowSettings(ignore_eos=True)))  # all the context
    assert big.finished.wait(120) and long.finished.is_set()
    assert engine.batches == 2 and engine.segments <= 3  # not one per 2 steps of the long job
    assert (big.error, len(big.new_ids)) == (None, 128 - len(ids)) and long.new_ids == _alone(b, long).new_ids


def test_a_job_that_begins_as_a_finished_one_prefills_only_the_rest(loaded):
    """With a prefix cache, a job whose prompt begins with a finished job's text (a conversation's next
    turn) goes on from that job's cache: only its new tokens are prefilled, and it answers as alone."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    engine = Engine(b, max_batch=4, wait_ms=0, min_segment=2, prefix_cache_tokens=1000)
    first = engine.submit(Job(tok.encode("rev the quick brown fox="), "a", 8))
    assert first.finished.wait(60) and engine.prefix.tokens > 0
    turn = first.ids + first.new_ids + tok.encode(" and rev abc=")
    with forwards(b.model("a")) as seen:
        second = engine.submit(Job(turn, "a", 6))
        assert second.finished.wait(60)
    assert seen[0] == (1, len(tok.encode(" and rev abc=")))  # the new tokens only (the last answer token too)
    assert engine.reused_tokens == len(first.ids) + len(first.new_ids) - 1
    assert second.new_ids == _alone(b, second).new_ids
    other = engine.submit(Job(turn, "b", 6))  # another branch: no cache of its own
    assert other.finished.wait(60) and engine.reused_tokens == len(first.ids) + len(first.new_ids) - 1
    salted = engine.submit(Job(turn, "a", 6, salt="tenant-2"))  # another tenant's salt: not first's cache
    assert salted.finished.wait(60) and engine.reused_tokens == len(first.ids) + len(first.new_ids) - 1
    assert salted.new_ids == second.new_ids


def test_logprobs_recorded_as_drawn_go_on_across_segments(loaded):
    """A job asking for logprobs has each new token's log-probability under the model's own logits (before
    its bias and temperature, as vLLM gives them) and its likeliest tokens, recorded as drawn; one that joins
    a running batch keeps them aligned with its tokens from one segment to the next (and none for the
    padding steps of a row that ended), equal to scoring its text in one pass."""
    b = loaded[0.9]
    tok = b.tokenizer("a")
    engine = Engine(b, max_batch=4, wait_ms=0, min_segment=2)
    long = engine.submit(Job(tok.encode("rev hello="), "a", 60, sampling=RowSettings(ignore_eos=True, logprobs=0)))
    _started(engine)
    forced = tok.convert_tokens_to_ids("z")
    jobs = engine.submit_many([
        Job(tok.encode("add 5+5="), "b", 4, sampling=RowSettings(logprobs=3)),
        Job(tok.encode("key zz="), "c", 30, sampling=RowSettings(temperature=0.9, seed=2, logprobs=2)),
        Job(tok.encode("add 1+1="), "a", 5, sampling=RowSettings(logprobs=1, logit_bias={forced: 100.0}))])
    for j in [long, *jobs]:
        assert j.finished.wait(120) and j.error is None
    assert engine.segments >= 3
    for j in [long, *jobs]:
        k = j.sampling.logprobs
        assert len(j.record) == len(j.new_ids) > 0
        ref = b.token_logprobs(j.ids + j.new_ids, j.branch, top=max(k, 1))
        assert [e.logprob for e in j.record] == pytest.approx(ref.logprobs[len(j.ids):], abs=1e-4)
        for e, top in zip(j.record, ref.top[len(j.ids):]):
            assert len(e.top) == k and [i for i, _ in e.top] == [i for i, _ in top[:k]]
    assert jobs[2].new_ids == [forced] * 5 and max(e.logprob for e in jobs[2].record) < -1.0  # the model's own
    assert long.new_ids == _alone(b, Job(long.ids, "a", 60, sampling=RowSettings(ignore_eos=True))).new_ids
