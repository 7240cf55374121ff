"""The command line a child server is started with gives back the arguments it was built from."""

from __future__ import annotations

from pathlib import Path

from radixlm.cli import build_parser, engine_args_from, server_args_from
from radixlm.engine.args import EngineArgs
from radixlm.server.args import ServerArgs
from radixlm.server.child_process import serve_argv


def test_serve_argv_round_trips_through_the_parser(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages }}")
    engine = EngineArgs(
        model_path="some/model",
        disable_radix_cache=True,
        schedule_policy="fcfs",
        max_wait_s=2.5,
        mem_fraction_static=0.3,
        chat_template=str(template),
        random_seed=7,
        kv_cache_dir=str(tmp_path / "kv"),
        kv_disk_size=0.5,
        kv_disk_policy="write_through",
    )
    server = ServerArgs(port=0, api_key="k", max_queued_tokens=99, log_level="error")
    for e, s in ((engine, server), (EngineArgs(), ServerArgs())):
        ns = build_parser().parse_args(["serve", *serve_argv(e, s)])
        assert (engine_args_from(ns), server_args_from(ns)) == (e, s)
