"""``gna plot``: the committed forward benchmark (``benchmarks/results/forward.jsonl``, rows
appended by ``benchmarks/bench_forward.py``) as a PNG for the README: per problem, the speedup
over dense cuDNN of gna, FlexAttention and NATTEN's published Hopper kernels, against the
FLOP-wise bound. matplotlib is imported only to draw (the ``plot`` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["ResultRow", "load_forward_results", "plot_forward_results"]


@dataclass(frozen=True)
class ResultRow:
    """One problem of ``benchmarks/results/forward.jsonl``: speedups over dense cuDNN (None
    when missing), or the error a peer reported."""

    problem: str
    flop_bound: float | None
    gna: float | None
    flex_flat: float | None
    flex_tiled: float | None
    natten_published: float | None
    errors: tuple[str, ...] = ()  # entries that reported an error instead of a time
    gpu: str | None = None


_PEERS = ("gna", "flex_flat", "flex_tiled")


def _speedup(row: dict, key: str):
    """``(speedup, error)`` of ``row[key]``: the stored speedup, else cuDNN's ms over its ms."""
    entry = row.get(key)
    if not isinstance(entry, dict):
        return None, False
    if "error" in entry:
        return None, True
    if isinstance(entry.get("speedup"), (int, float)):
        return float(entry["speedup"]), False
    base = row.get("cudnn")
    if isinstance(entry.get("ms"), (int, float)) and isinstance(base, dict) and \
            isinstance(base.get("ms"), (int, float)) and entry["ms"] > 0:
        return base["ms"] / entry["ms"], False
    return None, False


def load_forward_results(path, dtype: str = "float16", head_dim: int = 128) -> list[ResultRow]:
    """Per problem (in order of first appearance), the latest measurement of each of gna and
    FlexAttention among the rows with this dtype and head dim, and NATTEN's published
    speedup. A peer missing from the latest row is taken from the latest row that has it."""
    latest: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e})") from None
            if row.get("dtype") != dtype or row.get("head_dim") != head_dim \
                    or "problem" not in row:
                continue
            found = latest.setdefault(row["problem"], {"row": row})
            found["row"] = row
            for key in _PEERS:
                value, error = _speedup(row, key)
                if value is not None or error:
                    found[key] = (value, error)
    rows = []
    for name, found in latest.items():
        row = found["row"]
        values = {key: found.get(key, (None, False)) for key in _PEERS}
        rows.append(ResultRow(
            problem=name, flop_bound=row.get("flop_bound"),
            gna=values["gna"][0], flex_flat=values["flex_flat"][0],
            flex_tiled=values["flex_tiled"][0], natten_published=row.get("natten_published"),
            errors=tuple(k for k, (_, error) in values.items() if error), gpu=row.get("gpu")))
    return rows


def plot_forward_results(rows: list[ResultRow], path, title: str | None = None) -> None:
    """Grouped bars per problem: speedup over dense cuDNN of gna, FlexAttention (flat and
    tiled layouts) and NATTEN's published number, with the FLOP-wise bound as a line over
    each group; "n/a" marks a missing measurement, "err" one that failed."""
    from matplotlib.figure import Figure  # lazy: only the plot needs matplotlib

    series = (("gna", "gna", "tab:blue"), ("flex_flat", "FlexAttention (flat)", "tab:orange"),
              ("flex_tiled", "FlexAttention (tiled)", "tab:olive"),
              ("natten_published", "NATTEN Hopper (published)", "tab:gray"))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.8))
    ax = fig.subplots()
    top = max([1.0] + [v for r in rows for v in (r.flop_bound, r.gna, r.flex_flat,
                                                   r.flex_tiled, r.natten_published)
                       if isinstance(v, (int, float))])
    for s, (key, label, color) in enumerate(series):
        xs = [i - 0.4 + (s + 0.5) * width for i in range(len(rows))]
        values = [getattr(r, key) for r in rows]
        ax.bar([x for x, v in zip(xs, values) if v is not None],
               [v for v in values if v is not None], width, label=label, color=color)
        for x, v, r in zip(xs, values, rows):
            if v is not None:
                ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=6)
            elif key != "natten_published" or r.flop_bound not in (None, 1.0):
                ax.text(x, 0.01 * top, "err" if key in r.errors else "n/a", ha="center",
                        va="bottom", fontsize=6, rotation=90, color="tab:red")
    labelled = False
    for i, r in enumerate(rows):
        if r.flop_bound is not None:
            ax.hlines(r.flop_bound, i - 0.45, i + 0.45, colors="black", linestyles="--",
                      label=None if labelled else "FLOP-wise bound")
            labelled = True
    ax.set_xticks(range(len(rows)), [r.problem for r in rows], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 1.25 * top)
    ax.set_ylabel("speedup over dense cuDNN (x)")
    gpus = sorted({r.gpu for r in rows if r.gpu})
    ax.set_title(title or f"forward speedup over dense cuDNN, {', '.join(gpus) or 'GPU'}",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper right", ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
