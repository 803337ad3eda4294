"""Run folders: where a new run goes (`new_run_dir`), what it may write into (`check_output_dir`,
`refuse_to_replace_a_run`), and what makes `--resume` safe: a checkpoint records which run it belongs to and
what its files hold.

Every checkpoint gets a `manifest.json`, written last inside its temp folder (so a complete checkpoint always has
one): the sha256 of each of its files and the resolved config minus the keys a resume may change. On `--resume`:

- a finished run (summary.json) is refused: there is nothing left to train;
- stale temp folders and files left by a kill (`.step-*.tmp`, `.*.tmp`) are removed;
- the newest complete checkpoint whose files match their hashes is used; a damaged one (flipped bytes, a missing
  key, a truncated RNG file) is skipped for the previous complete one, and stderr says so;
- a config that differs in any other key stops the run, naming the changed keys, so a run is never continued
  with a different learning rate, seed, batch size, data or method.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from peftkit.config import flat_config
from peftkit.errors import PeftkitError, short_error

MANIFEST = "manifest.json"
REQUIRED_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
# keys a resume may change: the step budget (max_steps, epochs, max_epochs alike), logging, evaluation and
# checkpoint cadence, where things are written
RESUMABLE_KEYS = frozenset(
    {
        "recipe",
        "train.max_steps",
        "train.epochs",
        "train.max_epochs",
        "train.log_every",
        "train.report_to",
        "train.eval_every",
        "train.eval_batch_size",
        "train.progress",
        "train.checkpoint_every",
        "train.output_dir",
        "train.run_name",
        "train.device",
        "task.data_dir",
        "expected",  # the recipe's measured result, dropped by an override that changes the run (load_config)
    }
)
# keys added after checkpoints were first written, with the value every older checkpoint ran with
ADDED_KEYS = {"train.dropout_rng": "torch"}
_STEP = re.compile(r"^step-\d+$")


def resume_view(config) -> dict[str, Any]:
    """The resolved config as flat `section.key` values, minus RESUMABLE_KEYS: what a checkpoint is tied to."""
    flat = flat_config(config.to_dict())
    return {k: v for k, v in sorted(flat.items()) if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_KEYS}


def config_hash(view: dict[str, Any]) -> str:
    return hashlib.sha256("\n".join(f"{k}={_canonical(v)}" for k, v in sorted(view.items())).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, view: dict[str, Any] | None) -> None:
    """Hash every file in a checkpoint folder being written; call it last, inside the temp folder."""
    from peftkit.io import atomic_write_json

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(
        folder / MANIFEST,
        {"format": 1, "files": files, "config": view, "config_hash": config_hash(view) if view is not None else None},
    )


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest, after checking that every file it lists is present with the same sha256."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise PeftkitError(f"{path.name} has no {MANIFEST} (its write was interrupted, or an older peftkit wrote it)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise PeftkitError(f"{path.name}/{MANIFEST} is damaged ({short_error(e)})") from None
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise PeftkitError(f"{path.name}/{MANIFEST} does not list {', '.join(missing)}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise PeftkitError(f"{path.name}/{name} is missing")
        if sha256_file(file) != expected:
            raise PeftkitError(
                f"{path.name}/{name} does not match its sha256 in {MANIFEST} (the file was changed "
                "or damaged after it was written)"
            )
    return manifest


def changed_keys(
    saved: dict[str, Any] | None, current: dict[str, Any], ignored: frozenset[str] = RESUMABLE_KEYS
) -> list[str]:
    """The flat keys whose values differ, `ignored` keys (or sections) aside. A key older records lack compares as
    the value every run had before it was added (ADDED_KEYS), so an upgrade alone changes nothing. Local paths
    compare as absolute paths (local_paths.absolute_local_path): an older record's relative `st_tr.jsonl` is the same
    file as a run's absolute one, read from the same folder."""
    from peftkit.local_paths import absolute_local_path

    if saved is None:
        return []
    saved = {**{k: v for k, v in ADDED_KEYS.items() if k in current}, **saved}
    keys = sorted(k for k in set(saved) | set(current) if k not in ignored and k.split(".")[0] not in ignored)
    return [
        k
        for k in keys
        if _canonical(absolute_local_path(k, saved.get(k))) != _canonical(absolute_local_path(k, current.get(k)))
    ]


def _canonical(value: Any) -> str:
    """JSON text of a config value, numbers as floats: a YAML round trip may turn 16 into 16.0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return json.dumps(value, default=str, sort_keys=True)


def check_output_dir(output_dir: str | Path, run_dir: str | Path | None = None) -> None:
    """The run folder's parent must be a folder (or not exist yet), never a file such as /etc/passwd."""
    for path in (Path(output_dir), *([Path(run_dir)] if run_dir else [])):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise PeftkitError(f"cannot write a run under {path}: {probe} is a file, not a folder")


def new_run_dir(config) -> Path:
    """A fresh folder under train.output_dir: the run name, or recipe + time; `-1`, `-2`... never an existing one."""
    name = config.train.run_name or f"{config.recipe or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(config.train.output_dir) / name
    suffix = 1
    while path.exists():
        path, suffix = Path(config.train.output_dir) / f"{name}-{suffix}", suffix + 1
    return path


def refuse_to_replace_a_run(run_dir: Path) -> None:
    """A run folder named explicitly (`--run-dir`) is never trained over when it holds a finished run (its adapter
    and metrics would be replaced) or resumable checkpoints (a later --resume would mix them with the new run's)."""
    from peftkit.formats import SUMMARY_FILE

    if (run_dir / SUMMARY_FILE).is_file():
        raise PeftkitError(
            f"{run_dir} already holds a finished run ({SUMMARY_FILE}); choose another --run-dir, "
            "or remove that folder to train there again"
        )
    if any(is_checkpoint(p) for p in (run_dir / "checkpoints").glob("step-*")):
        raise PeftkitError(
            f"{run_dir} holds an unfinished run with checkpoints; continue it with --resume {run_dir}, "
            "or choose another --run-dir, or remove that folder to start over"
        )


def is_checkpoint(path: Path) -> bool:
    """A completed checkpoint folder (`step-0000002`); an interrupted write leaves a dotted temp folder instead."""
    return path.is_dir() and bool(_STEP.match(path.name))


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove what a killed run leaves: temp checkpoint folders and temp files beside the run's files."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.endswith(".old")):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class ResumePlan:
    """The complete checkpoints of a run that passed their integrity check, newest first, and what was skipped."""

    def __init__(self, run_dir: Path, config):
        from peftkit.formats import SUMMARY_FILE

        self.run_dir, self.folder = Path(run_dir), Path(run_dir) / "checkpoints"
        if (self.run_dir / SUMMARY_FILE).is_file():  # its checkpoints predate the end: resuming would train it again
            raise PeftkitError(
                f"{self.run_dir} is a finished run ({SUMMARY_FILE}); there is nothing to resume: its adapter is in "
                f"{self.run_dir / 'adapter'}; to train longer, start a new run with a larger budget"
            )
        stale = clean_stale(self.run_dir)
        complete = (
            sorted((p for p in self.folder.iterdir() if is_checkpoint(p)), reverse=True)
            if self.folder.is_dir()
            else []
        )
        if not complete:
            if any(p.parent.name == "checkpoints" and p.name.startswith(".step-") for p in stale):
                why = "a checkpoint write was interrupted before the first one completed"
            elif config.train.checkpoint_every is None:
                why = "train.checkpoint_every was not set for this run"
            else:
                why = f"the run stopped before its first checkpoint (step {config.train.checkpoint_every})"
            raise PeftkitError(f"{self.run_dir} has no checkpoint to resume from: {why}; start the run again")
        current = resume_view(config)
        self.candidates: list[Path] = []
        self.skipped: list[str] = []
        for path in complete:
            try:
                manifest = verify_checkpoint(path)
            except PeftkitError as e:
                self.skipped.append(str(e))
                continue
            changed = changed_keys(manifest.get("config"), current)
            if changed:
                saved = manifest["config"]
                shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in changed)
                raise PeftkitError(
                    f"--resume would continue {self.run_dir} as a different run: {shown} changed; "
                    "only the step budget, logging, evaluation/checkpoint cadence and output paths "
                    "may change on resume (start a new run instead)"
                )
            self.candidates.append(path)
        if not self.candidates:
            raise PeftkitError(
                f"{self.run_dir}: no complete, undamaged checkpoint to resume from ({'; '.join(self.skipped)})"
            )

    def load(self, model, optimizer, scheduler, ranks):
        """Load the newest checkpoint that loads (through `ranks`: sharded under FSDP); returns (path, TrainState,
        best weights)."""
        for path in self.candidates:
            try:
                state, best = ranks.load_checkpoint(path, model, optimizer, scheduler)
            except (PeftkitError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
                self.skipped.append(f"{path.name} does not load ({short_error(e, 160)})")
                continue
            for reason in self.skipped:
                print(f"peftkit: warning: skipped a damaged checkpoint: {reason}", file=sys.stderr)
            if self.skipped:
                print(f"peftkit: resuming from the previous complete checkpoint {path.name}", file=sys.stderr)
            return path, state, best
        raise PeftkitError(f"{self.run_dir}: no checkpoint could be loaded ({'; '.join(self.skipped)})")
