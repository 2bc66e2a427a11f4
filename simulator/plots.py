"""PNG plots of a simulation: latency over time and replicas over time.

matplotlib is imported lazily, inside each function (a ``dev`` extra, not a runtime dependency);
the Agg backend is used, so plots work without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from simulator.metrics import SimResult


def _finish(plt, fig, ax, path: str | Path, title: str, *, legend: bool = True) -> Path:
    """Legend, title, layout, then write ``path`` and free the figure."""
    if legend:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(results: Mapping[str, SimResult], path: str | Path, *, bin_s: float = 60.0,
                 title: str = "") -> Path:
    """TTFT p90 and TPOT p90 per arrival-time bin, one line per labelled result."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for label, result in results.items():
        s = result.latency_series(bin_s)
        t = [x / 60.0 for x in s["t_s"]]
        ax1.plot(t, s["ttft_p90_s"], label=label)
        ax2.plot(t, [x * 1e3 for x in s["tpot_p90_s"]], label=label)
    first = next(iter(results.values()), None)
    if first is not None:
        ax1.axhline(first.ttft_slo_s, color="grey", linestyle="--", linewidth=0.8)
        ax2.axhline(first.tbt_slo_s * 1e3, color="grey", linestyle="--", linewidth=0.8)
    ax1.set_ylabel("TTFT p90 (s)")
    ax1.set_yscale("log")
    ax2.set_ylabel("TPOT p90 (ms)")
    ax2.set_xlabel("arrival time (min)")
    return _finish(plt, fig, ax1, path, title)


def plot_replicas(results: Mapping[str, SimResult], path: str | Path, *, title: str = "") -> Path:
    """Provisioned prefill and decode instances over time, one pair of lines per labelled result."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, result in results.items():
        tl = result.timeline + [(result.end_s, *result.timeline[-1][1:])] if result.timeline else []
        t = [row[0] / 60.0 for row in tl]
        ax.step(t, [row[1] for row in tl], where="post", label=f"{label} prefill")
        ax.step(t, [row[2] for row in tl], where="post", linestyle="--", label=f"{label} decode")
    ax.set_xlabel("time (min)")
    ax.set_ylabel("instances (provisioned)")
    return _finish(plt, fig, ax, path, title)


def plot_bars(labels: Sequence[str], series: Mapping[str, Sequence[float]], path: str | Path, *,
              ylabel: str = "", title: str = "") -> Path:
    """Grouped bars: one group per label, one bar per series (benchmark summaries)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    return _finish(plt, fig, ax, path, title, legend=len(series) > 1)
