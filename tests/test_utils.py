"""Shared helpers: the progress bar of run_batch and the benchmarks."""

from __future__ import annotations

import io
import re

import pytest

from radixlm.utils import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stderr", "show", "shown"),
    [(_Terminal, None, True), (io.StringIO, None, False), (io.StringIO, True, True)],
    ids=["terminal", "captured", "captured-but-asked"],
)
def test_progress_shows_count_rate_and_eta(
    monkeypatch: pytest.MonkeyPatch, stderr: type[io.StringIO], show: bool | None, shown: bool
) -> None:
    """On stderr: by default only on a terminal, with show=True anywhere."""
    stream = stderr()
    monkeypatch.setattr("sys.stderr", stream)
    with progress(4, "runs", "run", show=show) as bar:
        bar.update(3)
        bar.refresh()
    text = stream.getvalue()
    if shown:
        assert re.search(r"runs:  75%\|.*\| 3/4 \[\d\d:\d\d<\d\d:\d\d, .*run/s\]", text), text
    else:
        assert text == ""
