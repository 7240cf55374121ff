"""The router's own Prometheus metrics, and the workers' metrics relabelled by worker."""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from radixlm.router.policy import Decision
from radixlm.router.workers import Worker

PREFIX = "radixlm_router:"
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (.*)")


class RouterMetrics:
    """Counters of routing decisions, retries and failed streams."""

    def __init__(self) -> None:
        self.routed: collections.Counter[tuple[str, str]] = collections.Counter()
        self.retries = 0
        self.stream_errors = 0

    def on_route(self, decision: Decision) -> None:
        """Count one decision."""
        self.routed[(decision.worker.url, decision.reason)] += 1

    def render(self, workers: Sequence[Worker]) -> str:
        """The router's metrics in Prometheus text."""
        lines = [
            f"# HELP {PREFIX}requests_total Requests routed, by worker and reason.",
            f"# TYPE {PREFIX}requests_total counter",
        ]
        for (url, reason), n in sorted(self.routed.items()):
            lines.append(f'{PREFIX}requests_total{{worker="{url}",reason="{reason}"}} {n}')
        lines += [
            f"# TYPE {PREFIX}retries_total counter",
            f"{PREFIX}retries_total {self.retries}",
            f"# TYPE {PREFIX}stream_errors_total counter",
            f"{PREFIX}stream_errors_total {self.stream_errors}",
            f"# TYPE {PREFIX}workers_healthy gauge",
            f"{PREFIX}workers_healthy {sum(w.healthy for w in workers)}",
        ]
        for name, help_ in (
            ("in_flight", "Requests sent to the worker and not ended."),
            ("prefill_tokens", "Uncached prompt tokens of its requests with no output yet."),
            ("decoding", "Its requests that have streamed output and not ended."),
            ("cached_tokens", "Tokens in the worker's cache, as mirrored."),
        ):
            lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} gauge"]
            for w in workers:
                lines.append(f'{PREFIX}{name}{{worker="{w.url}"}} {w.to_dict()[name]}')
        return "\n".join(lines) + "\n"


def merge(texts: Sequence[tuple[str, str]]) -> list[str]:
    """Several workers' metrics (worker url, Prometheus text) as one exposition: a worker label
    on each sample, each family's HELP and TYPE once, its samples together."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for worker, text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split()
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    header, _ = families.setdefault(family, ([], []))
                    if line not in header:
                        header.append(line)
                continue
            m = _SAMPLE.fullmatch(line)
            if m is None:
                continue
            labels = m.group(2)
            label = f'worker="{worker}"'
            labels = "{" + label + ("," + labels[1:] if labels else "}")
            families.setdefault(family or m.group(1), ([], []))[1].append(
                f"{m.group(1)}{labels} {m.group(3)}"
            )
    return [line for header, samples in families.values() for line in header + samples]
