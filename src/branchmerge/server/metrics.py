"""Prometheus metrics for ``serve`` and ``gateway``: ``GET /metrics`` in the text exposition format (0.0.4).

No client library: a registry of counters, gauges (set, or read when scraped) and histograms, safe to
update from the engine thread and the event loop. Every label takes values from a bounded set (the
routes this server has, HTTP statuses, branch, model and upstream names of its config), so a client
that calls random paths or model names cannot grow the registry.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


class Family:
    """One metric (all its label sets): a counter, a gauge or a histogram."""

    def __init__(self, kind: str, name: str, help_: str, labels: tuple[str, ...], lock: threading.Lock,
                 buckets: tuple[float, ...] = (), read: Callable[[], dict[tuple[str, ...], float]] | None = None
                 ) -> None:
        self.kind, self.name, self.help, self.labels, self._lock = kind, name, help_, labels, lock
        self.buckets, self.read = buckets, read
        self.values: dict[tuple[str, ...], float] = {}
        self.hist: dict[tuple[str, ...], list[float]] = {}  # per label set: bucket counts, then sum, count

    def _key(self, labels: Iterable[str]) -> tuple[str, ...]:
        key = tuple(str(v) for v in labels)
        if len(key) != len(self.labels):
            raise ValueError(f"metric {self.name} takes labels {self.labels}, got {key}")
        return key

    def inc(self, *labels: str, by: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + by

    def set(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = float(value)

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            h = self.hist.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def get(self, *labels: str) -> float:
        """A counter's or gauge's value (0 when never set); a histogram's count."""
        key = self._key(labels)
        with self._lock:
            if self.kind == "histogram":
                return self.hist.get(key, [0.0])[-1]
            return self.values.get(key, 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        if self.read is not None:
            values = {self._key(k): float(v) for k, v in self.read().items()}
        else:
            with self._lock:
                values = dict(self.values)
        if self.kind != "histogram":
            if not values and not self.labels:
                values = {(): 0.0}
            out += [f"{self.name}{_labels(self.labels, k)} {_num(v)}" for k, v in sorted(values.items())]
            return out
        with self._lock:
            hist = {k: list(v) for k, v in self.hist.items()}
        for k, h in sorted(hist.items()):
            for b, c in [*zip(self.buckets, h), (math.inf, h[-1])]:
                le = 'le="' + ("+Inf" if math.isinf(b) else repr(float(b))) + '"'  # as prometheus_client
                out.append(f"{self.name}_bucket{_labels(self.labels, k, le)} {_num(c)}")
            out.append(f"{self.name}_sum{_labels(self.labels, k)} {_num(h[-2])}")
            out.append(f"{self.name}_count{_labels(self.labels, k)} {_num(h[-1])}")
        return out


class Registry:
    """The metrics of one server; :meth:`render` is the body of ``GET /metrics``."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, prefix: str = "branchmerge_") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self.families: dict[str, Family] = {}

    def _add(self, kind: str, name: str, help_: str, labels: Iterable[str], **kw) -> Family:
        name = self.prefix + name
        if name in self.families:
            raise ValueError(f"metric {name} is registered twice")
        fam = Family(kind, name, help_, tuple(labels), self._lock, **kw)
        self.families[name] = fam
        return fam

    def counter(self, name: str, help_: str, labels: Iterable[str] = (),
                read: Callable[[], dict[tuple[str, ...], float]] | None = None) -> Family:
        """A counter that is incremented, or (``read``) one whose running total is read when scraped."""
        return self._add("counter", name, help_, labels, read=read)

    def gauge(self, name: str, help_: str, labels: Iterable[str] = (),
              read: Callable[[], dict[tuple[str, ...], float]] | None = None) -> Family:
        """A gauge that is set, or (``read``) one computed when scraped: ``{label values: value}``."""
        return self._add("gauge", name, help_, labels, read=read)

    def histogram(self, name: str, help_: str, labels: Iterable[str] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Family:
        return self._add("histogram", name, help_, labels, buckets=tuple(sorted(buckets)))

    def render(self) -> str:
        return "\n".join(line for fam in self.families.values() for line in fam.render()) + "\n"


class HTTPMetrics:
    """What every server counts at its HTTP edge: requests by route and status, their duration (to the
    last byte, a stream's included), and answers by the model asked for and the branch that answered."""

    def __init__(self, registry: Registry, routes: Iterable[str], models: Callable[[], list[str]]) -> None:
        self.routes, self.models = frozenset(routes), models
        self.requests = registry.counter("http_requests_total", "HTTP requests by route and status.",
                                         ("route", "status"))
        self.duration = registry.histogram("http_request_duration_seconds",
                                           "Time from a request's arrival to its last byte.", ("route",))
        self.answers = registry.counter("answers_total", "Answers by the model asked for and the branch "
                                        "that answered (auto and pipelines name theirs).", ("model", "branch"))

    def route(self, path: str) -> str:
        for prefix in ("/v1/responses/", "/v1/models/"):
            if path.startswith(prefix):
                path = prefix + "{id}"
        return path if path in self.routes else "other"

    def answered(self, model: str, branches: str) -> None:
        if model not in self.models():  # only names this server has (anything else was a 404)
            return
        for b in dict.fromkeys(branches.split(",")):
            if b:
                self.answers.inc(model, b)


class EngineMetrics:
    """What the engine (``serve``) counts: jobs waiting and running, tokens by branch, batch sizes (rows and
    distinct branches: how mixed the batches are) and batch durations. Updated from the engine thread."""

    def __init__(self, registry: Registry, engine) -> None:
        registry.gauge("num_requests_waiting", "Jobs (a prompt's choice each) waiting for a batch.",
                       read=lambda: {(): engine.queued()})
        registry.gauge("num_requests_running", "Jobs in the batch running now.", read=lambda: {(): engine.running})
        registry.counter("cancelled_jobs_total", "Jobs dropped before running because their client went away.",
                         read=lambda: {(): engine.cancelled_jobs})
        registry.counter("kv_reused_tokens_total", "Tokens not prefilled because a kept KV cache held them: a "
                         "running row's (continuous batching) or a finished request's (prefix cache).",
                         read=lambda: {(): engine.reused_tokens})
        registry.gauge("prefix_cache_tokens", "Tokens of finished requests' KV caches kept for later requests.",
                       read=lambda: {(): engine.prefix.tokens if engine.prefix is not None else 0})
        self.prompt = registry.counter("prompt_tokens_total", "Prompt tokens run, by branch (once per choice).",
                                       ("branch",))
        self.generated = registry.counter("generation_tokens_total", "Tokens generated, by branch.", ("branch",))
        self.failed = registry.counter("failed_jobs_total", "Jobs whose batch failed, by branch.", ("branch",))
        self.rows = registry.histogram("batch_size", "Rows per engine batch.", ("kind",), buckets=SIZE_BUCKETS)
        self.mixed = registry.histogram("batch_branches", "Distinct branches per engine batch.", ("kind",),
                                        buckets=SIZE_BUCKETS)
        self.seconds = registry.histogram("batch_duration_seconds", "Time one engine batch took.", ("kind",))

    def batch(self, jobs: list, seconds: float, finished: list | None = None) -> None:
        """Record a batch (or a generation segment) of :class:`~.engine.Job`; the tokens of those that
        ``finished`` in it (default: all)."""
        kind = "score" if jobs[0].score is not None else "generate"
        self.rows.observe(len(jobs), kind)
        self.mixed.observe(len({j.branch for j in jobs}), kind)
        self.seconds.observe(seconds, kind)
        for j in jobs if finished is None else finished:
            if j.error is not None:
                self.failed.inc(j.branch)
                continue
            self.prompt.inc(j.branch, by=len(j.ids))
            if j.new_ids:
                self.generated.inc(j.branch, by=len(j.new_ids))
