"""Prometheus metrics under SGLang's `sglang:` names, written in the text exposition format."""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field
from typing import Any

# SGLang's bucket bounds, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    2.0,
    4.0,
    6.0,
    8.0,
    10.0,
    20.0,
    40.0,
    60.0,
    80.0,
    120.0,
    160.0,
)
ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040,
    0.050, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.1,
    0.2,
    0.4,
    0.8,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    40.0,
    60.0,
    80.0,
    100.0,
    150.0,
    200.0,
    300.0,
    500.0,
)
THROUGHPUT_WINDOW_S = 10.0


@dataclass
class Histogram:
    """Cumulative-bucket histogram, as Prometheus exposes it."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float, times: int = 1) -> None:
        """Record `value` (`times` times: one output that carried several tokens)."""
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.bounds):
            self.counts[i] += times
        self.total += value * times
        self.count += times

    def lines(self, name: str, labels: str) -> list[str]:
        """The `_bucket`, `_sum` and `_count` samples."""
        out = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass
class ServerMetrics:
    """Counters and latency histograms kept by the HTTP side as outputs arrive."""

    model_name: str
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    num_requests: int = 0
    engine_restarts: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    # (time, tokens) of recent outputs, for the generation throughput gauge.
    _recent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def on_tokens(self, n: int, now: float, since_submit: float, since_last: float | None) -> None:
        """A request produced n tokens; since_last is None for its first."""
        self.generation_tokens += n
        self._recent.append((now, n))
        self._trim(now)  # bounded even when nobody reads /metrics
        if since_last is None:
            self.ttft.observe(since_submit)
        else:
            self.itl.observe(since_last / n, times=n)

    def on_finish(
        self, prompt_tokens: int, cached_tokens: int, e2e_s: float, queue_s: float | None
    ) -> None:
        """A request ended (any reason); queue_s is None if it never left the queue."""
        self.num_requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.e2e.observe(e2e_s)
        if queue_s is not None:
            self.queue.observe(queue_s)

    @property
    def cache_hit_rate(self) -> float:
        """Share of finished requests' prompt tokens that came from the radix cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def gen_throughput(self, now: float | None = None) -> float:
        """Generated tokens per second over the last THROUGHPUT_WINDOW_S seconds."""
        now = time.perf_counter() if now is None else now
        self._trim(now)
        return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def _trim(self, now: float) -> None:
        """Forget outputs older than the throughput window."""
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def render(self, engine_stats: dict[str, Any] | None) -> str:
        """The exposition text; engine gauges are left out when the engine cannot answer."""
        labels = f'model_name="{_escape(self.model_name)}"'
        out: list[str] = []

        def sample(name: str, kind: str, doc: str, value: float) -> None:
            out.extend(
                [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
            )

        if engine_stats is not None:
            sample(
                "sglang:num_running_reqs",
                "gauge",
                "Requests decoding or prefilling.",
                engine_stats["num_running_reqs"],
            )
            sample(
                "sglang:num_queue_reqs",
                "gauge",
                "Requests waiting to be scheduled.",
                engine_stats["num_queue_reqs"],
            )
            sample(
                "sglang:num_used_tokens",
                "gauge",
                "KV slots held by running requests.",
                engine_stats["num_used_tokens"],
            )
            sample(
                "sglang:token_usage",
                "gauge",
                "Share of the KV pool held by running requests.",
                engine_stats["token_usage"],
            )
            spec: dict[str, dict[str, int]] = engine_stats.get("spec", {})
            if spec:
                sample(
                    "sglang:spec_accept_length",
                    "gauge",
                    "Tokens per step that verified a speculative draft (accepted drafts + 1).",
                    accept_length(spec),
                )
            for key, doc in (
                ("drafted", "Speculative draft tokens fed, by draft source."),
                ("accepted", "Speculative draft tokens accepted, by draft source."),
                ("verified", "Speculative drafts verified, by draft source."),
            ):
                full = f"sglang:spec_{key}_tokens" if key != "verified" else "sglang:spec_drafts"
                if spec:
                    out += [f"# HELP {full} {doc}", f"# TYPE {full} counter"]
                out += [
                    f'{full}_total{{{labels},algorithm="{name}"}} {c[key]}'
                    for name, c in spec.items()
                ]
            sample(
                "radixlm:disk_cache_tokens",
                "gauge",
                "Tokens with K/V in the disk tier (--kv-cache-dir).",
                engine_stats["disk_cache_tokens"],
            )
            for tier in ("pool", "disk"):
                sample(
                    f"radixlm:cache_hit_tokens_{tier}_total",
                    "counter",
                    f"Prompt tokens admitted from the cache found in the {tier} tier.",
                    engine_stats[f"cache_hit_tokens_{tier}"],
                )
        sample(
            "sglang:cache_hit_rate",
            "gauge",
            "Prompt tokens served from the radix cache, as a share.",
            self.cache_hit_rate,
        )
        sample(
            "sglang:gen_throughput",
            "gauge",
            "Generated tokens per second (recent).",
            self.gen_throughput(),
        )
        for name, doc, value in (
            ("prompt_tokens", "Prompt tokens of finished requests.", self.prompt_tokens),
            ("generation_tokens", "Generated tokens.", self.generation_tokens),
            ("cached_tokens", "Prompt tokens found in the radix cache.", self.cached_tokens),
            ("num_requests", "Finished requests.", self.num_requests),
            (
                "engine_restarts",
                "Engine restarts after the engine process died.",
                self.engine_restarts,
            ),
        ):
            full = f"sglang:{name}"
            out.extend(
                [
                    f"# HELP {full} {doc}",
                    f"# TYPE {full} counter",
                    f"{full}_total{{{labels}}} {value}",
                ]
            )
        for name, doc, hist in (
            ("time_to_first_token_seconds", "Time to the first generated token.", self.ttft),
            ("inter_token_latency_seconds", "Time between generated tokens.", self.itl),
            ("e2e_request_latency_seconds", "Time from arrival to the last token.", self.e2e),
            ("queue_time_seconds", "Time from arrival at the scheduler to admission.", self.queue),
        ):
            full = f"sglang:{name}"
            out.extend(
                [f"# HELP {full} {doc}", f"# TYPE {full} histogram", *hist.lines(full, labels)]
            )
        return "\n".join(out) + "\n"


def accept_length(spec: dict[str, dict[str, int]]) -> float:
    """Tokens per step that verified a draft, over the draft sources of CoreStats.spec (as a
    dict): the accepted drafts and the model's own token; 0.0 before any draft."""
    verified = sum(c["verified"] for c in spec.values())
    return (sum(c["accepted"] for c in spec.values()) + verified) / verified if verified else 0.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
