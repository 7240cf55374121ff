"""The benchmark commands' figures (`--plot [DIR]`): matplotlib PNGs, drawn without a display.

Each command draws what it measured in that run; docs/benchmarks.md shows the PNGs written
under docs/img/ by the command lines it quotes.
"""

from __future__ import annotations

import argparse
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(__file__).parents[1] / "docs" / "img"
COLOURS = ["#3b6ea5", "#c8553d", "#7a9e3b", "#8e6bb8", "#d19a2a", "#4a9c9c"]


def add_plot_arg(parser: argparse.ArgumentParser) -> None:
    """`--plot [DIR]`: also write the run's figures as PNGs (default DIR: docs/img)."""
    parser.add_argument(
        "--plot",
        nargs="?",
        const=str(DEFAULT_DIR),
        default=None,
        metavar="DIR",
        help=f"write the figures of this run as PNGs into DIR (default {DEFAULT_DIR})",
    )


def cpu_name() -> str:
    """The CPU's model name as lscpu prints it (the figures say which machine drew them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def _label(value: float) -> str:
    """A bar's value: whole numbers with thousands separators from 100 up, else 3 digits."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'radixlm[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, plt: Any, out_dir: str, name: str, note: str) -> Path:
    fig.text(0.99, 0.005, note or cpu_name(), ha="right", va="bottom", fontsize=7, color="#666")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure: {path}")
    return path


def bar_charts(
    out_dir: str,
    name: str,
    title: str,
    categories: Sequence[str],
    panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
    note: str = "",
    log_panels: Sequence[int] = (),
) -> Path:
    """One panel per (y label, {series: a value per category}), grouped bars side by side.

    Each bar is labelled with its value; a panel in `log_panels` has a logarithmic axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for i, (ax, (ylabel, series)) in enumerate(zip(axes[0], panels, strict=True)):
        width = 0.8 / max(len(series), 1)
        for j, (label, values) in enumerate(series.items()):
            xs = [k + (j - (len(series) - 1) / 2) * width for k in range(len(categories))]
            bars = ax.bar(xs, values, width, label=label, color=COLOURS[j % len(COLOURS)])
            ax.bar_label(bars, fmt=_label, fontsize=7, padding=1)
        ax.set_xticks(range(len(categories)), categories, fontsize=8)
        ax.set_ylabel(ylabel)
        if i in log_panels:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        ax.margins(y=0.15)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, plt, out_dir, name, note)


def line_chart(
    out_dir: str,
    name: str,
    title: str,
    xlabel: str,
    ylabel: str,
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    note: str = "",
) -> Path:
    """Lines over a logarithmic x axis (batch sizes), one per series, points marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for j, (label, values) in enumerate(series.items()):
        ax.plot(xs, values, marker="o", label=label, color=COLOURS[j % len(COLOURS)])
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=11)
    return _save(fig, plt, out_dir, name, note)
