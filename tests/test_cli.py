"""The command line's engine flags become EngineArgs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from radixlm.cli import add_engine_args, build_parser, engine_args_from, server_args_from
from radixlm.engine.args import EngineArgs
from radixlm.router.launch import worker_engine_args
from radixlm.server.args import ServerArgs


def parse(*argv: str) -> EngineArgs:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_args_from(parser.parse_args(argv))


def test_defaults_are_the_engine_arguments_defaults() -> None:
    assert parse() == EngineArgs()


def test_scheduling_flags() -> None:
    args = parse("--schedule-policy", "fcfs", "--max-wait-s", "2.5", "--chunked-prefill-size", "64")
    assert (args.schedule_policy, args.max_wait_s, args.chunked_prefill_size) == ("fcfs", 2.5, 64)


def test_a_negative_age_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_wait_s"):
        parse("--max-wait-s", "-1")


def test_serve_flags() -> None:
    ns = build_parser().parse_args(
        ["serve", "--port", "0", "--max-queued-requests", "8", "--max-queued-tokens", "900"]
    )
    assert ns.command == "serve"
    args = server_args_from(ns)
    assert (args.port, args.max_queued_requests, args.max_queued_tokens) == (0, 8, 900)
    assert server_args_from(build_parser().parse_args(["serve"])) == ServerArgs()


def test_restart_flags() -> None:
    ns = build_parser().parse_args(
        ["serve", "--max-engine-restarts", "0", "--engine-restart-window-s", "30"]
    )
    args = server_args_from(ns)
    assert (args.max_engine_restarts, args.engine_restart_window_s) == (0, 30.0)
    with pytest.raises(ValueError, match="max_queued_tokens"):
        server_args_from(build_parser().parse_args(["serve", "--max-queued-tokens", "-1"]))


def test_request_timeout_flag() -> None:
    assert parse().request_timeout is None
    assert parse("--request-timeout", "30").request_timeout == 30.0
    with pytest.raises(ValueError, match="request_timeout"):
        parse("--request-timeout", "0")


def test_mem_fraction_static_flag() -> None:
    assert parse().mem_fraction_static is None
    assert parse("--mem-fraction-static", "0.4").mem_fraction_static == 0.4
    with pytest.raises(ValueError, match="mem_fraction_static"):
        parse("--mem-fraction-static", "1.5")


def test_tp_flag_and_its_sglang_spellings() -> None:
    assert parse().tp_size == 1
    assert parse("--tp", "2").tp_size == parse("--tp-size", "2").tp_size == 2
    with pytest.raises(ValueError, match="tp_size must be positive"):
        parse("--tp", "0")


def test_chat_template_flag(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert parse("--chat-template", str(template)).chat_template == str(template)
    with pytest.raises(ValueError, match="chat_template .* is not a file"):
        parse("--chat-template", str(tmp_path / "missing.jinja"))


def test_log_level_and_accepted_sglang_flags() -> None:
    ns = build_parser().parse_args(["serve", "--log-level", "warning", "--enable-metrics"])
    assert server_args_from(ns).log_level == "warning"
    assert server_args_from(build_parser().parse_args(["serve"])).log_level == "info"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "loud"])


def test_disk_tier_flags(tmp_path: Path) -> None:
    args = parse(
        "--kv-cache-dir", str(tmp_path), "--kv-disk-size", "2.5", "--kv-disk-policy", "off"
    )
    assert (args.kv_cache_dir, args.kv_disk_size, args.kv_disk_policy) == (
        str(tmp_path),
        2.5,
        "off",
    )
    assert (parse().kv_cache_dir, parse().kv_disk_policy) == (None, "selective")
    with pytest.raises(ValueError, match="kv_disk_size"):
        parse("--kv-disk-size", "0")
    with pytest.raises(ValueError, match="kv_disk_policy"):
        EngineArgs(kv_disk_policy="always")


def test_ray_flags() -> None:
    ns = build_parser().parse_args(["serve", "--dp", "2", "--ray", "--ray-num-gpus", "1"])
    assert (ns.ray, ns.ray_address, ns.ray_num_cpus, ns.ray_num_gpus) == (True, None, 1.0, 1.0)
    assert not build_parser().parse_args(["serve"]).ray


def test_each_dp_replica_gets_its_own_disk_tier_directory(tmp_path: Path) -> None:
    args = parse("--kv-cache-dir", str(tmp_path), "--kv-disk-size", "4")
    replicas = [worker_engine_args(args, i, 2) for i in range(2)]
    assert [r.kv_cache_dir for r in replicas] == [
        str(tmp_path / "worker-0"),
        str(tmp_path / "worker-1"),
    ]
    assert [r.kv_disk_size for r in replicas] == [2.0, 2.0]
    assert worker_engine_args(parse(), 1, 2) == parse()
