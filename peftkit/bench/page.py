"""index.html: the whole report in one self-contained file that opens offline in any browser and can be mailed.

Tables sort when a header is clicked (a few lines of inline JavaScript), plots are embedded as base64 PNG data URIs,
and nothing is fetched from anywhere: no CDN, no font, no external file. Every piece of text from cell files is
escaped, since task names and errors come from users' data.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any

from peftkit.bench.plots import Plot
from peftkit.bench.tables import (
    COLUMN_HELP,
    COMMANDS_HEADING,
    KEPT_HELP,
    budget_table,
    machine_line,
    main_metrics_line,
    missing_line,
    selection_table,
    summary_table,
    task_notes,
    task_table,
)
from peftkit.io import atomic_write_text

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
.scroll { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, table.kv td { text-align: left; }
table.kv td, table.cells td { white-space: normal; }
table.cells td { font-family: ui-monospace, monospace; font-size: 12px; }
table.cells td, table.cells th { text-align: left; }
thead th { background: #f3f3f3; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-order="asc"]::after { content: " \\25B2"; }
table.sortable th[data-order="desc"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafafa; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 1em; }
figure { margin: 0 0 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
code, .mono { font-family: ui-monospace, monospace; font-size: 13px; }
nav a { margin-right: 1em; }
"""

# Sort a table by the clicked column: numbers by value (`80.9 ± 1.1` by 80.9, `22,713,986`, `5e-05`), other text
# alphabetically; a second click reverses; empty cells (`-`) stay last either way.
SORT_SCRIPT = """
function sortKey(text) {
  const m = text.replace(/,/g, "").trim().match(/^-?\\d*\\.?\\d+(e[-+]?\\d+)?/i);
  return m ? parseFloat(m[0]) : null;
}
function compareCells(x, y, dir) {
  x = x.trim(); y = y.trim();
  if (x === "-" || y === "-") return (x === "-") - (y === "-");
  const a = sortKey(x), b = sortKey(y);
  if (a !== null && b !== null) return dir * (a - b);
  if (a !== null || b !== null) return a !== null ? -1 : 1;
  return dir * x.localeCompare(y);
}
for (const table of document.querySelectorAll("table.sortable")) {
  const headers = table.tHead.rows[0].cells;
  for (const th of headers) {
    th.title = "click to sort";
    th.addEventListener("click", () => {
      const dir = th.dataset.order === "asc" ? -1 : 1;
      for (const other of headers) delete other.dataset.order;
      th.dataset.order = dir === 1 ? "asc" : "desc";
      const body = table.tBodies[0], col = th.cellIndex;
      const rows = Array.from(body.rows);
      rows.sort((r, s) => compareCells(r.cells[col].textContent, s.cells[col].textContent, dir));
      for (const row of rows) body.appendChild(row);
    });
  }
}
"""


def write_page(
    path: Path,
    report: dict[str, Any],
    tasks: list[str],
    methods: list[str],
    plots: dict[str, list[Plot]],
    cells: list[dict[str, Any]],
) -> None:
    atomic_write_text(path, render_page(report, tasks, methods, plots, cells))


def render_page(
    report: dict[str, Any],
    tasks: list[str],
    methods: list[str],
    plots: dict[str, list[Plot]],
    cells: list[dict[str, Any]],
) -> str:
    """The HTML document: overview, protocol, summary, budgets, selection, one section per task, then the manifest."""
    rows, env = report["rows"], report["environment"]
    title = f"peftkit bench results ({', '.join(report['profiles'])} profile)"
    body = [f"<h1>{escape(title)}</h1>", navigation(tasks)]
    body.append(commands_html(env.get("commands") or []))
    body.append(f"<p>{escape(machine_line(env))} Generated {escape(report['generated_at'])}.</p>")
    if missing_line(report):
        body.append(f"<p><strong>{escape(missing_line(report))}</strong></p>")
    if report.get("protocol"):
        body += ['<h2 id="protocol">Protocol</h2>', paragraphs(report["protocol"])]
    body += ['<h2 id="summary">Summary: main validation metric (%), mean ± std over seeds</h2>']
    body += [html_table(*summary_table(report, tasks, methods)), f"<p>{escape(main_metrics_line(report, tasks))}</p>"]
    body += ['<h2 id="budgets">Budgets</h2>', html_table(*budget_table(report))]
    if report.get("selection"):
        body += ['<h2 id="selection">Learning-rate selection</h2>', html_table(*selection_table(report["selection"]))]
    for i, task in enumerate(tasks):
        body.append(task_block(i, task, [r for r in rows if r["task"] == task], plots.get(task, [])))
    body += [failed_cells(report["cells"]), columns_help(), manifest_section(report, cells)]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + f"\n<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n"
    )


def navigation(tasks: list[str]) -> str:
    links = [("summary", "Summary"), ("budgets", "Budgets")]
    links += [(f"task-{i}", task) for i, task in enumerate(tasks)] + [("manifest", "Manifest")]
    return "<nav>" + "".join(f'<a href="#{anchor}">{escape(text)}</a>' for anchor, text in links) + "</nav>"


def paragraphs(text: str) -> str:
    return "\n".join(f"<p>{escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def html_table(header: list[str], rows: list[list[Any]], css: str = "sortable") -> str:
    """A table whose headers sort it (class `sortable`, see SORT_SCRIPT); every cell escaped."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in r) + "</tr>\n" for r in rows)
    table = f'<table class="{css}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>'
    return f'<div class="scroll">{table}</div>'  # a wide task table scrolls instead of spilling off the page


def key_value_table(pairs: dict[str, Any]) -> str:
    body = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>\n" for k, v in pairs.items())
    return f'<table class="kv">\n<tbody>\n{body}</tbody>\n</table>'


def commands_html(commands: list[dict[str, Any]]) -> str:
    """The command(s) that made the cells, as in results.md: one, or a list with each sitting's cell count."""
    if len(commands) == 1:
        return f"<p>Command: <code>{escape(commands[0]['command'])}</code></p>"
    items = "".join(f"<li><code>{escape(c['command'])}</code> ({c['cells']} cells)</li>" for c in commands)
    return f"<p>{escape(COMMANDS_HEADING)}</p><ul>{items}</ul>"


def task_block(index: int, task: str, task_rows: list[dict[str, Any]], plots: list[Plot]) -> str:
    """One task: its table, its reference scores, and its plots inline with their captions."""
    parts = [f'<section id="task-{index}">', f"<h2>{escape(task)}</h2>", html_table(*task_table(task_rows))]
    parts += [f"<p>{escape(note)}</p>" for note in task_notes(task_rows)]
    if plots:
        parts += ['<div class="plots">', *(figure(p, f"{task}: {Path(p.path).stem}") for p in plots), "</div>"]
    return "\n".join(parts + ["</section>"])


def figure(plot: Plot, alt: str) -> str:
    """The PNG inline as a data URI, so the page needs no file beside it; 256 colours keep a 20-plot page small."""
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    with Image.open(plot.path) as image:
        image.convert("RGB").quantize(256).save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(plot.caption)}</figcaption></figure>"
    )


def failed_cells(cells: list[dict[str, Any]]) -> str:
    failed = [c for c in cells if c["status"] != "ok"]
    if not failed:
        return ""
    items = "".join(f"<li><code>{escape(c['cell'])}</code>: {escape(first_line(c['error']))}</li>" for c in failed)
    return f'<h2 id="failed">Failed cells</h2>\n<ul>{items}</ul>'


def first_line(text: str | None) -> str:
    return (text or "").splitlines()[0] if (text or "").strip() else ""


def columns_help() -> str:
    items = "".join(f"<dt><b>{escape(k)}</b></dt><dd>{escape(v)}</dd>" for k, v in COLUMN_HELP.items())
    items += f"<dt><b>val/test metric</b></dt><dd>{escape(KEPT_HELP)}</dd>"
    return f'<h2 id="columns">Columns</h2>\n<dl>{items}</dl>'


def manifest_section(report: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    """Where and how the numbers were made: machine, command, library versions (of the first successful cell), then
    every cell's commit, recipe and overrides, since a grid resumed across commits mixes them."""
    summary = {"profiles": ", ".join(report["profiles"]), "generated at": report["generated_at"]}
    summary.update(report["environment"])
    per_cell = [
        [
            c["cell"],
            c["status"],
            git_label(c["manifest"]),
            c["manifest"].get("recipe") or "-",
            " ".join(c["manifest"].get("overrides") or []),
        ]
        for c in cells
    ]
    return (
        '<h2 id="manifest">Manifest</h2>\n'
        + key_value_table(summary)
        + f"\n<details><summary>Every cell's commit, recipe and overrides ({len(cells)} cells)</summary>\n"
        + html_table(["cell", "status", "git", "recipe", "overrides"], per_cell, css="sortable cells")
        + "\n</details>"
    )


def git_label(manifest: dict[str, Any]) -> str:
    """A short commit, `+dirty` where the tree had uncommitted changes."""
    commit = (manifest.get("git_commit") or "unknown")[:10]
    return commit + ("+dirty" if manifest.get("git_dirty") else "")
