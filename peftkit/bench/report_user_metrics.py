"""The report's share of `peftkit bench --metric`: user-metric columns for results.csv/json and one results.md table.

Kept apart from report.py so the built-in tables stay as they are. A cell scored by evaluate modules holds
`user_metrics = {"validation": {"<module>:<key>": x}, "test": {...}}`, plus `"error": "..."` naming the modules
that failed in the cell (the others keep their scores); a row gets `<split>_<module>:<key>_mean` / `_std` over its
ok seeds, like the built-in metrics.
"""

from __future__ import annotations

import statistics
from typing import Any

from peftkit.user_metrics import SEPARATOR

SPLITS = ("validation", "test")


def user_metric_means(ok_cells: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's user-metric columns (mean and sample std over the seeds that scored each), plus any cell errors."""
    scored = [c["user_metrics"] for c in ok_cells if isinstance(c.get("user_metrics"), dict)]
    columns: dict[str, Any] = {}
    for split in SPLITS:
        names = sorted({name for u in scored for name in (u.get(split) or {})})
        for name in names:
            values = [u[split][name] for u in scored if name in (u.get(split) or {})]
            columns[f"{split}_{name}_mean"] = statistics.fmean(values)
            columns[f"{split}_{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
    errors = sorted({u["error"] for u in scored if u.get("error")})
    if errors:
        columns["user_metric_errors"] = errors
    return columns


def user_metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """results.csv's extra columns: every `<split>_<module>:<key>_<mean|std>` any row has, validation first."""
    keys = {k for r in rows for k in r if SEPARATOR in k}
    return sorted(keys, key=lambda k: (not k.startswith("validation_"), k))


def user_metrics_section(rows: list[dict[str, Any]]) -> list[str]:
    """results.md's table of user metrics per task and method (none when the grid ran without --metric).

    Values are shown as the module returns them (mean ± std, 4 significant digits): their scale is the module's.
    """
    pairs = [
        (split, k[len(split) + 1 : -len("_mean")])
        for split in SPLITS
        for k in user_metric_columns(rows)
        if k.startswith(f"{split}_") and k.endswith("_mean")
    ]
    errors = [(r, e) for r in rows for e in r.get("user_metric_errors", [])]
    if not pairs and not errors:
        return []
    lines = ["## User metrics (evaluate modules, `--metric`)", ""]
    if pairs:
        header = ["task", "method", "seeds", *(f"{'val' if s == 'validation' else s} {n}" for s, n in pairs)]
        table = [
            [r["task"], r["method"], f"{r['ok']}/{r['cells']}", *(_mean_std(r, s, n) for s, n in pairs)]
            for r in rows
            if any(r.get(f"{s}_{n}_mean") is not None for s, n in pairs)
        ]
        aligns = ["---", "---"] + ["---:"] * (len(header) - 2)
        lines += ["| " + " | ".join(map(str, line)) + " |" for line in (header, aligns, *table)] + [""]
    lines += [f"- {r['task']} / {r['method']}: {e}" for r, e in errors] + ([""] if errors else [])
    return lines


def _mean_std(row: dict[str, Any], split: str, name: str) -> str:
    mean, std = row.get(f"{split}_{name}_mean"), row.get(f"{split}_{name}_std")
    if mean is None:
        return "-"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")
