"""Training metrics: one JSON object per line (``metrics.jsonl``) and PNG plots drawn from them."""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from mmx.errors import DiskFullError
from mmx.utils.io import atomic_path
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


class MetricsLog:
    """``metrics.jsonl``: one record per line, appended as training goes.

    A run killed mid-append leaves a last line without its newline (possibly cut inside a character); reading drops
    it, with a warning, and every run rewrites the log when it starts, so the torn line never reaches a resume."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """A resumed run rewrites what came after its checkpoint, so the log never holds two versions of a step."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(f"the disk is full: no space left on the device of {self.path}") from e
            raise

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        torn = lines.pop()  # after the last newline: b"" unless an append was cut short
        if torn.strip():
            logger.warning("%s: dropping a torn last line (a run was killed while writing it): %r", self.path, torn)
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
                raise ValueError(f"{self.path}, line {number}: not a JSON record ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{self.path}, line {number}: a JSON {type(record).__name__}, not a record")
            records.append(record)
        return records


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


Series = dict[str, tuple[list[float], list[float]]]


def plot_panels(
    path: str, panels: dict[str, Series], ylabels: dict[str, str] | None = None, smooth_keys: tuple = ()
) -> None:
    """One line plot per panel (title -> named (x, y) series) side by side in a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), dpi=110, squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for name, (xs, ys) in series.items():
            if not xs:
                continue
            if name in smooth_keys and len(ys) > 10:
                ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth(ys), label=f"{name} (smoothed)", color=ax.lines[-1].get_color())
            else:
                ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel((ylabels or {}).get(title, ""))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if any(xs for xs, _ in series.values()):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_curves(path: str, series: Series, title: str, ylabel: str, smooth_keys: tuple = ()) -> None:
    plot_panels(path, {title: series}, {title: ylabel}, smooth_keys)


def column(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have ``key``."""
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_loss(metrics: list[dict[str, Any]], path: str, title: str = "training loss") -> None:
    series = {"train": column(metrics, "loss"), "eval": column(metrics, "eval_loss")}
    plot_curves(path, series, title, "cross-entropy (nats/token)", smooth_keys=("train",))
