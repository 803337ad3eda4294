"""The bench report from synthetic cell records (nothing trains): index.html, reference lines, training curves,
readable labels, the learning-rate selection table, and cell files written before `majority_rate`/`curve` existed."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftkit.bench import build_report
from peftkit.bench.curves import curve_split, mean_curve
from peftkit.bench.plots import HEAD_PROBE, MAJORITY, draw_references, label_moves, reference_lines

pytest.importorskip("matplotlib")
REPO = Path(__file__).resolve().parent.parent
HOSTILE_TASK = "x<script>alert(1)"  # task names come from users' file names; no `/`, which a file stem cannot hold


def cell(task: str, method: str, seed: int, accuracy: float, params: int, **extra: Any) -> dict[str, Any]:
    """A successful cell record with the fields the report reads (see runner.measure_cell)."""
    return {
        "cell": f"{task}__{method}__seed{seed}",
        "task": task,
        "method": method,
        "seed": seed,
        "status": "ok",
        "error": None,
        "task_metrics": ["accuracy", "f1"],
        "validation": {"accuracy": accuracy, "f1": accuracy - 0.05},
        "test": None,
        "trainable_params": params,
        "trainable_pct": params / 1e5,
        "adapter_bytes": 4 * params,
        "peak_memory_mb": params / 1000,
        "memory_kind": "process_peak_rss",
        "model_state_mb": 10.0,
        "train_seconds": 5.0,
        "train_examples_per_s": 100.0,
        "latency_ms_per_example": 1.0,
        "steps": 20,
        "examples_seen": 320,
        "train_examples": 320,
        "validation_examples": 50,
        "device": "cpu",
        "environment": {"torch": "2.x", "peftkit": "0.1.0", "torch_threads": 1},
        **extra,
        "manifest": {
            "profile": "smoke",
            "profile_description": "Synthetic cells & <tags> for the report tests.",
            "command": "peftkit bench --profile smoke",
            "cpu_model": "Test CPU",
            "cpu_count": 2,
            "git_commit": "0123456789abcdef",
            "git_dirty": seed == 1,
            "recipe": f"{task}-{method}",
            "overrides": ["train.max_steps=20", f"train.seed={seed}"],
            "config": {
                "task": {"max_train_examples": 320, "max_length": 64, "max_eval_examples": 50},
                "train": {
                    "lr": 1e-3,
                    "max_steps": 20,
                    "epochs": 1,
                    "batch_size": 16,
                    "grad_accum_steps": 1,
                    "eval_every": 10,
                    "bf16": False,
                },
            },
        },
    }


def curve(final: float, seconds: float, steps: tuple[int, ...] = (0, 10, 20)) -> list[dict[str, Any]]:
    return [
        {
            "step": s,
            "examples_seen": 16 * s,
            "train_seconds": seconds * s / 20,
            "split": "validation",
            "accuracy": 0.5 + (final - 0.5) * s / 20,
        }
        for s in steps
    ]


def write_cells(out: Path, cells: list[dict[str, Any]]) -> Path:
    (out / "cells").mkdir(parents=True)
    for c in cells:
        (out / "cells" / f"{c['cell']}.json").write_text(json.dumps(c))
    return out


@pytest.fixture
def new_cells() -> list[dict[str, Any]]:
    """Cells with the new fields: majority_rate, curve, and a `head` probe; one task with a hostile name."""
    cells = []
    for task in ("toy", HOSTILE_TASK):
        for seed in (0, 1):
            for method, accuracy, params in (
                ("head", 0.6, 500),
                ("lora", 0.8 + seed / 100, 2000),
                ("full", 0.85, 10**5),
            ):
                extra = {"majority_rate": 0.55, "curve": curve(accuracy, 4.0 + seed)}
                cells.append(cell(task, method, seed, accuracy, params, **extra))
    return cells


def test_page_is_self_contained_escaped_and_sortable(new_cells, tmp_path):
    out = write_cells(tmp_path / "bench", new_cells)
    build_report(out)
    page = (out / "index.html").read_text()

    assert "http://" not in page and "https://" not in page
    links = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links), links
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) == 8  # 2 tasks x (params, memory, curve-time, curve-examples)
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(pngs) and all(base64.b64decode(u)[:4] == b"\x89PNG" for u in uris)

    assert "<script>alert(1)" not in page and "x&lt;script&gt;alert(1)" in page
    assert "Synthetic cells &amp; &lt;tags&gt;" in page  # the protocol text, from the manifests, escaped
    assert page.count("<script>") == 1 and 'class="sortable"' in page and "addEventListener" in page
    assert "Test CPU" in page and "peftkit bench --profile smoke" in page  # the manifest
    assert "<td>0123456789+dirty</td>" in page  # each cell's commit: a resumed grid can mix them
    assert "Learning-rate selection" not in page  # no selection.json


def test_reference_lines_and_curves_appear_in_plots_and_tables(new_cells, tmp_path):
    out = write_cells(tmp_path / "bench", new_cells)
    build_report(out)
    for suffix in ("params", "memory", "curve-time", "curve-examples"):
        assert (out / "plots" / f"toy-{suffix}.png").read_bytes()[:4] == b"\x89PNG", suffix
    markdown = (out / "results.md").read_text()
    assert "(plots/toy-curve-time.png)" in markdown and "(plots/toy-curve-examples.png)" in markdown
    assert "Reference lines (validation %): head probe 60.0, majority class 55.0." in markdown
    assert "mean over the method's seeds" in markdown  # the curve caption says how seeds were combined
    assert "head probe 60.0" in (out / "index.html").read_text()
    row = next(r for r in json.loads((out / "results.json").read_text())["rows"] if r["method"] == "lora")
    assert row["majority_rate"] == pytest.approx(0.55)


def test_old_cells_without_new_fields_still_build_a_report(tmp_path):
    old = [cell("toy", m, 0, a, p) for m, a, p in (("lora", 0.8, 2000), ("full", 0.85, 10**5))]
    old.append({**cell("toy", "miss", 0, 0.0, 1), "status": "failed", "error": "ValueError: r too large\ntrace"})
    out = write_cells(tmp_path / "bench", old)
    build_report(out)
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["toy-memory.png", "toy-params.png"]
    markdown, page = (out / "results.md").read_text(), (out / "index.html").read_text()
    assert "Reference lines" not in markdown and "Reference lines" not in page
    assert "curve-" not in markdown and "toy__miss__seed0</code>: ValueError: r too large" in page


def test_selection_file_renders_a_learning_rate_table_and_joins_the_protocol(new_cells, tmp_path):
    out = write_cells(tmp_path / "bench", new_cells)
    selection = {
        "protocol": "Learning rates chosen on a dev split.",
        "tasks": {"toy": {"lora": {"chosen_lr": 0.002, "dev": {"0.001": 0.7, "0.002": 0.75}}}},
    }
    (out / "selection.json").write_text(json.dumps(selection))
    report = build_report(out)
    assert report["protocol"].endswith("Learning rates chosen on a dev split.")
    page, markdown = (out / "index.html").read_text(), (out / "results.md").read_text()
    assert "Learning-rate selection" in page and "<th>dev @ 0.001</th>" in page
    assert "| toy | lora | 0.002 | 70.0 | 75.0 |" in markdown


def test_reference_lines_need_head_cells_and_accuracy_for_the_majority_line():
    def row(method: str, main: str = "accuracy", majority: float | None = 0.3) -> dict[str, Any]:
        return {"method": method, "main_metric": main, f"validation_{main}_mean": 0.7, "majority_rate": majority}

    assert reference_lines([row("head"), row("lora")]) == {HEAD_PROBE: 0.7, MAJORITY: 0.3}
    assert reference_lines([row("lora", majority=None)]) == {}
    assert reference_lines([row("head", main="f1")]) == {HEAD_PROBE: 0.7}  # a majority rate is not an F1 score


def test_a_far_reference_is_named_in_the_legend_instead_of_squashing_the_points():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    drawn = draw_references(ax, {HEAD_PROBE: 0.50, MAJORITY: 0.013}, [48.0, 55.0])
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert drawn == [pytest.approx(50.0)]
    assert labels == ["head probe (50.0%)", "majority class (1.3%), below the axis"]


def test_mean_curve_averages_seeds_at_shared_steps_and_split_follows_the_records():
    seeds = [{"curve": curve(0.9, 4.0)}, {"curve": curve(0.7, 6.0, steps=(0, 10))}]
    assert [p["step"] for p in mean_curve(seeds, "validation", "accuracy")] == [0, 10]
    assert mean_curve(seeds, "validation", "accuracy")[1] == pytest.approx(
        {"step": 10, "examples_seen": 160, "train_seconds": 2.5, "accuracy": 0.65}
    )
    assert mean_curve(seeds, "dev", "accuracy") == []
    dev = [{"curve": [{**r, "split": "dev"} for r in curve(0.9, 4.0)] + curve(0.9, 4.0, steps=(20,))}]
    assert curve_split(dev, "accuracy") == "dev"


def test_label_moves_part_overlapping_labels_and_lift_them_off_other_markers():
    apart = [(0, 0, 40, 10), (100, 0, 140, 10)]
    assert label_moves(apart, [(-5, -5, 0, 0), (95, -5, 100, 0)]) == [0.0, 0.0]
    overlapping = [(0, 0, 40, 10), (10, 4, 50, 14)]  # 6 px of overlap: each moves (6 + 2) / 2 apart
    assert label_moves(overlapping, [(-99, -99, -98, -98)] * 2) == [-4.0, 4.0]
    on_a_marker = [(0, 10, 40, 20), (200, 0, 210, 5)]  # label 0 sits on marker 1, a little above its centre
    assert label_moves(on_a_marker, [(-20, -20, -10, -10), (5, 8, 15, 18)])[0] == pytest.approx(9.0)


def test_screenshot_script_says_clearly_when_chromium_is_missing(tmp_path):
    (tmp_path / "index.html").write_text("<!DOCTYPE html><title>t</title>")
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "screenshot.py"), str(tmp_path), str(tmp_path / "shot.png")],
        capture_output=True,
        text=True,
        env={"PATH": str(empty_path)},
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "screenshot: no Chromium found (looked for chromium, chromium-browser, google-chrome); "
        "install it: apt-get install chromium"
    ]


def test_a_grid_run_in_sittings_names_every_command_with_its_cell_count(new_cells, tmp_path):
    for c in new_cells:
        if c["task"] == "toy":
            c["manifest"] = {**c["manifest"], "command": "peftkit bench --profile smoke --tasks toy"}
    out = write_cells(tmp_path / "bench", new_cells)
    build_report(out)
    markdown, page = (out / "results.md").read_text(), (out / "index.html").read_text()
    assert "- `peftkit bench --profile smoke --tasks toy` (6 cells)" in markdown
    assert "- `peftkit bench --profile smoke` (6 cells)" in markdown and "Command: " not in markdown
    assert "<li><code>peftkit bench --profile smoke --tasks toy</code> (6 cells)</li>" in page


def test_times_measured_on_a_busy_machine_are_marked(new_cells, tmp_path):
    for c in new_cells:
        c["other_cores"] = 1.0 if (c["method"], c["seed"]) == ("lora", 1) else 0.0
    out = write_cells(tmp_path / "bench", new_cells)
    build_report(out)
    markdown = (out / "results.md").read_text()
    lora = next(line for line in markdown.splitlines() if line.startswith("| lora | 2/2 |"))
    full = next(line for line in markdown.splitlines() if line.startswith("| full | 2/2 |"))
    assert "5.0 * | 100.0 * | 1.00 * |" in lora and " * |" not in full
    assert "(seeds: lora 1 of 2): these times and rates are not speed claims" in markdown
    assert "lora 1 of 2" in (out / "index.html").read_text()


def test_load_meter_sees_another_process_keep_a_core_busy():
    from peftkit.measure import LoadMeter

    meter = LoadMeter()
    code = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    subprocess.run([sys.executable, "-c", code], check=True)  # this process waits: the child's CPU is not its own
    assert meter.other_cores() >= 0.5


def test_a_grid_timed_on_two_machines_says_which_rows_each_timed(new_cells, tmp_path):
    for c in new_cells:
        if c["method"] == "full":
            c["manifest"] = {**c["manifest"], "cpu_model": "Other CPU"}
    out = write_cells(tmp_path / "bench", new_cells)
    build_report(out)
    markdown, page = (out / "results.md").read_text(), (out / "index.html").read_text()
    assert "Machines: Other CPU (4 cells), Test CPU (8 cells)" in markdown
    note = "Timed on more than one machine (Other CPU: full; Test CPU: "
    assert note in markdown and note in page
    single = write_cells(tmp_path / "one", [c for c in new_cells if c["method"] != "full"])
    build_report(single)
    assert "Timed on more than one machine" not in (single / "results.md").read_text()


def test_summary_means_only_tasks_that_share_a_main_metric(tmp_path):
    from peftkit.bench.tables import summary_table

    shared = [cell(t, "lora", 0, accuracy, 2000) for t, accuracy in (("a", 0.8), ("b", 0.6))]
    report = build_report(write_cells(tmp_path / "shared", shared))
    assert summary_table(report, ["a", "b"], ["lora"]) == (
        ["method", "a", "b", "mean accuracy"],
        [["lora", "80.0", "60.0", "70.0"]],
    )

    mixed = [shared[0], {**shared[1], "task_metrics": ["f1", "accuracy"]}]  # b's main metric is F1: 55.0
    report = build_report(write_cells(tmp_path / "mixed", mixed))
    assert summary_table(report, ["a", "b"], ["lora"]) == (["method", "a", "b"], [["lora", "80.0", "55.0"]])
    assert "No mean column: the tasks' main metrics differ" in (tmp_path / "mixed" / "results.md").read_text()
