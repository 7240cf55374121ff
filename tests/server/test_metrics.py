"""/metrics: Prometheus text under SGLang's names, and counters that follow the traffic."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import httpx
import pytest
from server_harness import metric, parse_metrics

from radixlm.core.messages import CoreStats, SpecCounters
from radixlm.server.metrics import THROUGHPUT_WINDOW_S, Histogram, ServerMetrics

GAUGES = [
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:num_used_tokens",
    "sglang:token_usage",
    "sglang:cache_hit_rate",
    "sglang:gen_throughput",
]
COUNTERS = [
    "sglang:prompt_tokens_total",
    "sglang:generation_tokens_total",
    "sglang:cached_tokens_total",
    "sglang:num_requests_total",
]
HISTOGRAMS = [
    "sglang:time_to_first_token_seconds",
    "sglang:inter_token_latency_seconds",
    "sglang:e2e_request_latency_seconds",
    "sglang:queue_time_seconds",
]


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    h.observe(0.05)
    h.observe(0.5, times=3)
    h.observe(7.0)
    lines = h.lines("x", 'm="a"')
    assert lines == [
        'x_bucket{m="a",le="0.1"} 1',
        'x_bucket{m="a",le="1.0"} 4',
        'x_bucket{m="a",le="+Inf"} 5',
        'x_sum{m="a"} 8.55',
        'x_count{m="a"} 5',
    ]


def test_render_without_engine_stats_still_parses() -> None:
    m = ServerMetrics('odd "name"')
    m.on_tokens(1, now=10.0, since_submit=0.3, since_last=None)
    m.on_tokens(2, now=10.1, since_submit=0.4, since_last=0.1)
    m.on_finish(prompt_tokens=10, cached_tokens=4, e2e_s=0.5, queue_s=0.2)
    m.on_finish(prompt_tokens=3, cached_tokens=0, e2e_s=0.1, queue_s=None)  # aborted while queued
    samples = parse_metrics(m.render(None))
    assert metric(samples, "sglang:queue_time_seconds_count") == 1
    assert metric(samples, "sglang:queue_time_seconds_sum") == 0.2
    assert metric(samples, "sglang:generation_tokens_total") == 3
    assert metric(samples, "sglang:cache_hit_rate") == 4 / 13
    assert metric(samples, "sglang:inter_token_latency_seconds_count") == 2
    assert "sglang:num_running_reqs" not in "".join(samples)


def test_speculative_counters_by_draft_source() -> None:
    stats = CoreStats(
        *(1, 0, 10, 0.1, 100, 5, 7, 0),
        spec={"ngram": SpecCounters(10, 6, 4), "radix": SpecCounters(8, 8, 2)},
    )
    samples = parse_metrics(ServerMetrics("m").render(dataclasses.asdict(stats)))
    assert samples['sglang:spec_drafted_tokens_total{model_name="m",algorithm="ngram"}'] == 10
    assert samples['sglang:spec_accepted_tokens_total{model_name="m",algorithm="radix"}'] == 8
    assert samples['sglang:spec_drafts_total{model_name="m",algorithm="ngram"}'] == 4
    assert metric(samples, "sglang:spec_accept_length") == (6 + 8 + 6) / 6
    off = parse_metrics(ServerMetrics("m").render(dataclasses.asdict(replace(stats, spec={}))))
    assert not any("spec" in name for name in off)


def test_the_throughput_window_stays_bounded_without_scrapes() -> None:
    m = ServerMetrics("m")
    for i in range(10_000):  # one output every 10 ms for 100 s; nobody reads /metrics
        m.on_tokens(2, now=i * 0.01, since_submit=0.1, since_last=0.01)
    assert len(m._recent) <= THROUGHPUT_WINDOW_S / 0.01 + 1
    assert m.gen_throughput(now=99.99) == pytest.approx(2 / 0.01, rel=0.01)
    assert m.generation_tokens == 20_000


def test_metrics_parse_and_counters_move(http: httpx.Client) -> None:
    before = parse_metrics(http.get("/metrics").text)
    for name in GAUGES + COUNTERS:
        metric(before, name)
    for name in HISTOGRAMS:
        for suffix in ("_sum", "_count"):
            metric(before, name + suffix)
        assert any(k.startswith(name + "_bucket{") and 'le="+Inf"' in k for k in before)
    prompt = "Metrics should count this prompt and its tokens"
    for _ in range(2):  # the second run finds the prompt in the cache
        r = http.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 5}})
        assert r.status_code == 200
    prompt_tokens = r.json()["meta_info"]["prompt_tokens"]
    after = parse_metrics(http.get("/metrics").text)

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert delta("sglang:num_requests_total") == 2
    assert delta("sglang:generation_tokens_total") == 10
    assert delta("sglang:prompt_tokens_total") == 2 * prompt_tokens
    assert delta("sglang:cached_tokens_total") >= prompt_tokens - 1
    assert delta("sglang:time_to_first_token_seconds_count") == 2
    assert delta("sglang:inter_token_latency_seconds_count") == 8
    assert delta("sglang:e2e_request_latency_seconds_count") == 2
    assert delta("sglang:queue_time_seconds_count") == 2
    assert (
        0
        <= delta("sglang:queue_time_seconds_sum")
        < delta("sglang:e2e_request_latency_seconds_sum")
    )
    assert 0 < metric(after, "sglang:cache_hit_rate") <= 1
    assert metric(after, "sglang:gen_throughput") > 0
    assert metric(after, "sglang:num_running_reqs") == 0


def test_engine_stats_split_cache_hits_by_tier() -> None:
    stats = CoreStats(
        num_running_reqs=0,
        num_queue_reqs=0,
        num_used_tokens=0,
        token_usage=0.0,
        max_total_num_tokens=100,
        cached_tree_tokens=0,
        num_forward_passes=0,
        num_retractions=0,
        cache_hit_tokens_pool=7,
        cache_hit_tokens_disk=5,
        disk_cache_tokens=40,
    )
    samples = parse_metrics(ServerMetrics("m").render(dataclasses.asdict(stats)))
    assert metric(samples, "radixlm:cache_hit_tokens_pool_total") == 7
    assert metric(samples, "radixlm:cache_hit_tokens_disk_total") == 5
    assert metric(samples, "radixlm:disk_cache_tokens") == 40
