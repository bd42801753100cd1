"""A real uvicorn server on a free loopback port, in a thread, for the duration of a block; and a record of
a model's forward passes (what a batch prefilled)."""

from __future__ import annotations

import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1; yields its base URL; stops the server afterwards. Idle connections are kept
    10 minutes (uvicorn's 5 s default let a test's client, which does not retry, reuse a connection the
    server was closing at that moment on a slow run: "Server disconnected without sending a response")."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=600))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    end = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < end and th.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(timeout=10)


def wait_queued(engine, n: int, timeout: float = 120.0, futures=()) -> None:
    """Wait until ``n`` jobs wait in ``engine`` (used with ``engine.paused()``). Generous: once, in a full run
    on two cores, three of twelve requests took over 30 s to reach a paused engine (and then answered).
    ``futures``: the requests' own; one that failed (it will never queue) raises its error at once."""
    end = time.monotonic() + timeout
    while engine.queued() < n:
        for f in futures:
            if f.done() and f.exception() is not None:
                raise AssertionError(f"a request failed before its job queued ({engine.queued()} of {n} "
                                     f"queued)") from f.exception()
        if time.monotonic() >= end:  # where every thread is (the server's event loop among them), to see why
            stacks = "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(sys._current_frames()[t.ident]))
                               for t in threading.enumerate() if t.ident in sys._current_frames())
            raise AssertionError(f"only {engine.queued()} of {n} jobs queued; threads:\n{stacks}")
        time.sleep(0.01)


def served_together(bundle, prompts: list[tuple[str, str]], max_tokens: int = 5) -> tuple[list[str], int, set[str]]:
    """Serve ``bundle`` over HTTP and send ``(prompt, model)`` completions concurrently with the openai SDK,
    all queued before the engine takes any: their greedy answers, the batches they took and the models
    ``/v1/models`` lists."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from branchmerge.server import create_app

    app = create_app(bundle, max_batch=8, wait_ms=50)
    engine = app.state.engine
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        listed = {m.id for m in client.models.list().data}
        before = engine.batches
        with ThreadPoolExecutor(len(prompts)) as ex:
            with engine.paused():
                futs = [ex.submit(lambda pn: client.completions.create(model=pn[1], prompt=pn[0], max_tokens=max_tokens,
                                                                       temperature=0).choices[0].text, pn)
                        for pn in prompts]
                wait_queued(engine, len(prompts), futures=futs)
            got = [f.result() for f in futs]
        return got, engine.batches - before, listed


@contextmanager
def forwards(model) -> Iterator[list[tuple[int, int]]]:
    """Record ``(rows, width)`` of every forward of ``model`` (its ``input_ids``) in the block."""
    seen: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def stop_process(p) -> None:
    """End a server started as a subprocess: SIGTERM, then (after 30 s) SIGKILL; reaped either way."""
    import signal

    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_listening(proc, url: str, timeout: float = 120.0, **kw):
    """GET ``url`` until a server started as the subprocess ``proc`` answers; returns that response. Fails
    with the server's stderr (when piped) if it exits first, or after ``timeout`` seconds."""
    import httpx

    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}): "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < end, f"the server did not answer {url} within {timeout:.0f} s"
        try:
            return httpx.get(url, timeout=2, **kw)
        except httpx.TransportError:
            time.sleep(0.2)


ROUTER_SAMPLES = {"a": ["add 1+2=", "add 5+5="], "b": ["rev abc=", "rev hello="], "c": ["key zz=", "key ab="]}


def routed_bundle(src, folder, pipelines: dict):
    """A copy of the test bundle ``src`` (branches a, b, c) in ``folder`` with ``pipelines`` and a router built
    from :data:`ROUTER_SAMPLES`, loaded."""
    import shutil

    import yaml

    import branchmerge
    from branchmerge.front import build_bundle_router
    from branchmerge.router import RouterConfig

    shutil.copytree(src, folder)
    (folder / "pipelines.yaml").write_text(yaml.safe_dump(pipelines))
    bundle = branchmerge.load(folder)
    build_bundle_router(bundle, RouterConfig(samples=ROUTER_SAMPLES, template="{input} field of", phrase="field of"))
    return bundle
