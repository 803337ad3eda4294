"""`peftkit bench`: train every (task, method, seed) cell through the one loop and tabulate what each method costs.

Read in this order:
  profiles.py  named budgets, read from recipes/profiles/<name>.yaml
  grid.py      the cells, checked before anything trains, and each cell's config (recipe + dotted overrides)
  selection.py a profile's learning-rate grid: run it at the first seed, choose on dev, then the other seeds
  runner.py    each cell trained by `train()` in its own spawned process -> one JSON file per cell in OUT/cells/
  executors.py where cells run: here (one at a time), on Ray, or on Slurm through submitit
  report.py    OUT/cells/*.json -> results.json / results.csv / results.md / index.html
  tables.py    the tables (one source for Markdown and HTML) and results.md
  page.py      index.html: one self-contained page, sortable tables, plots inline
  plots.py     per-task metric vs parameters / memory plots in OUT/plots/ (matplotlib, optional), reference lines
  curves.py    per-task metric vs training time / examples seen, from each cell's evaluations during training
"""

from __future__ import annotations

from peftkit.bench.grid import Cell, CellJob
from peftkit.bench.plots import pareto_front
from peftkit.bench.profiles import Profile, available_profiles, load_profile
from peftkit.bench.report import aggregate, build_report
from peftkit.bench.runner import run_bench

__all__ = [
    "Cell",
    "CellJob",
    "Profile",
    "aggregate",
    "available_profiles",
    "build_report",
    "load_profile",
    "pareto_front",
    "run_bench",
]
