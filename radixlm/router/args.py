"""`radixlm router`'s arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

POLICIES = (
    "cache_aware",
    "round_robin",
    "random",
    "power_of_two",
    "consistent_hash",
    "shortest_queue",
)
LOAD_METRICS = ("work", "queue")


@dataclass(frozen=True)
class RouterArgs:
    """Where the router listens, its workers, and how it picks one (SGLang's router defaults)."""

    worker_urls: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000  # 0: any free port
    api_key: str | None = None  # asked of clients, and sent to the workers
    policy: str = "cache_aware"
    # cache_aware: below this share of the prompt cached anywhere, route by estimated work.
    cache_threshold: float = 0.3
    # cache_aware: load (requests in flight) is unbalanced when max - min > abs and max > rel * min.
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    # cache_aware: the load that decides when the cache does not: estimated work (uncached
    # prefill tokens queued plus running decodes) or requests in flight (SGLang's).
    load_metric: str = "work"
    health_check_interval_s: float = 2.0
    tokenizer_path: str | None = None  # default: the workers' model
    log_level: str = "info"
    extra: dict[str, Any] = field(default_factory=dict)  # shown in server_info (e.g. --dp)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.load_metric not in LOAD_METRICS:
            raise ValueError(
                f"load_metric must be one of {', '.join(LOAD_METRICS)}; got {self.load_metric!r}"
            )
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if self.health_check_interval_s <= 0:
            raise ValueError("health_check_interval_s must be positive")

    def public(self) -> dict[str, Any]:
        """The arguments as server_info shows them (the API key left out)."""
        info = asdict(self)
        del info["api_key"]
        info.update(info.pop("extra"))
        return info


@dataclass(frozen=True)
class RayArgs:
    """The Ray cluster the replicas run on, and what each replica reserves there."""

    # None: RAY_ADDRESS, else the cluster `ray start` started on this machine, else a new one.
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError("ray_num_cpus must be positive and ray_num_gpus >= 0")

    @property
    def bundle(self) -> dict[str, float]:
        """One replica's resources."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}
