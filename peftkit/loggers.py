"""Where the loop's scalars go: metrics.jsonl always, and TensorBoard / MLflow (local file store) when asked with
`train.report_to`. Every sink gets the same records; all of them work offline and only rank 0 writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

from peftkit.errors import PeftkitError
from peftkit.formats import nan_as_null
from peftkit.io import atomic_write_text

ReportTo = Literal["tensorboard", "mlflow"]


class MetricsLog:
    """metrics.jsonl: one JSON object per line (train records and evaluations)."""

    def __init__(self, path: Path, enabled: bool, truncate_after: int = 0):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if truncate_after and path.exists():  # resuming: drop records past the checkpoint
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= truncate_after]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(nan_as_null(record)) + "\n")  # strict JSON: a NaN loss is null, as in summary.json

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl (a half-written last line from a killed run is left out)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a half-written last line (process killed mid-append) counts as past the end."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of a metrics.jsonl record: `train/<key>` or `<split>/<key>`, numbers only."""
    prefix = record.get("split", "train")
    values = {
        f"{prefix}/{k}": float(v)
        for k, v in record.items()
        if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return int(record["step"]), values


# the package each sink imports, and how to get it
SINK_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'peftkit[tensorboard]'"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


def check_report_to(report_to: list[str]) -> None:
    """Refuse a sink whose package is missing before the run loads or writes anything (not after the model)."""
    for name in report_to:
        package, install = SINK_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise PeftkitError(f"train.report_to=[{name}] needs the {package} package: {install}")


class TensorBoardLog:
    """TensorBoard event files in RUN_DIR/tensorboard (`pip install 'peftkit[tensorboard]'`)."""

    def __init__(self, folder: Path, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # its package was checked before the run began

        # resuming: TensorBoard hides the points past the checkpoint, as metrics.jsonl drops them (no duplicates)
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class MlflowLog:
    """An MLflow run in the local file store RUN_DIR/mlruns (`pip install mlflow`); nothing leaves the machine."""

    def __init__(self, folder: Path, run_name: str):
        import mlflow  # checked before the run began (check_report_to)

        self.mlflow = mlflow
        mlflow.set_tracking_uri(folder.resolve().as_uri())
        self.run = mlflow.start_run(run_name=run_name)

    def write(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class RunLog:
    """metrics.jsonl plus the sinks named in train.report_to, all fed the same records."""

    def __init__(self, run_dir: Path, enabled: bool, truncate_after: int = 0, report_to: list[str] = ()):
        self.sinks: list[Any] = [MetricsLog(run_dir / "metrics.jsonl", enabled, truncate_after)]
        if enabled:
            for name in dict.fromkeys(report_to):
                if name == "tensorboard":
                    self.sinks.append(TensorBoardLog(run_dir / "tensorboard", truncate_after))
                elif name == "mlflow":
                    self.sinks.append(MlflowLog(run_dir / "mlruns", run_dir.name))

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
