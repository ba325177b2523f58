"""The figures a sweep logs on its parent run: the objective per trial and per parameter.

Torch-free (matplotlib's Agg canvas, no pyplot), so whichever process ends a sweep draws them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

OBJECTIVE_BY_TRIAL = "objective_by_trial.png"
OBJECTIVE_BY_PARAMETER = "objective_by_parameter.png"
_COLORS = {"complete": "tab:blue", "pruned": "tab:orange"}


@dataclass(frozen=True)
class TrialPoint:
    """One trial as the figures show it."""

    number: int
    state: str  # complete, pruned, failed, cancelled
    value: float | None
    params: dict[str, Any]


def _scored(trials: Sequence[TrialPoint]) -> list[TrialPoint]:
    return [t for t in trials if t.value is not None and math.isfinite(t.value)]


def write_objective_by_trial(
    trials: Sequence[TrialPoint], objective: str, maximize: bool, path: Path
) -> None:
    """Each trial's objective (complete and pruned), and the best so far."""
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    scored = sorted(_scored(trials), key=lambda t: t.number)
    for state, color in _COLORS.items():
        points = [t for t in scored if t.state == state]
        ax.scatter([t.number for t in points], [t.value for t in points], color=color, label=state)
    best, xs, ys = None, [], []
    for t in scored:
        if t.state != "complete":
            continue
        assert t.value is not None
        if best is None or (t.value > best if maximize else t.value < best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    ax.set(title=f"{objective} per trial", xlabel="trial", ylabel=objective)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_objective_by_parameter(
    trials: Sequence[TrialPoint], objective: str, log_scale: dict[str, bool], path: Path
) -> None:
    """The objective against each searched parameter, one panel per parameter."""
    names = sorted(log_scale)
    fig = Figure(figsize=(4.5 * max(1, len(names)), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    scored = _scored(trials)
    for ax, name in zip(axes, names, strict=False):
        for state, color in _COLORS.items():
            points = [t for t in scored if t.state == state and name in t.params]
            xs = [t.params[name] for t in points]
            if xs and isinstance(xs[0], str):
                ax.scatter(xs, [t.value for t in points], color=color, label=state)
            else:
                ax.scatter(
                    [float(x) for x in xs], [t.value for t in points], color=color, label=state
                )
        if log_scale[name]:
            ax.set_xscale("log")
        ax.set(title=f"{objective} by {name}", xlabel=name, ylabel=objective)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
