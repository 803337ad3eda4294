"""A run's local paths made absolute where it starts, so its records (config.yaml, checkpoint manifests, the
adapter's meta) name the files it read, and eval, --resume and predict read the same ones from any working folder.

It sits above config, data and modeling: which value is a path is their rule (a task by load_task's, a model by
modeling's), not a second one here.
"""

from __future__ import annotations

import os
from typing import Any

from peftkit.config import RunConfig, TaskConfig
from peftkit.data import data_dir, is_path_task
from peftkit.modeling import is_local_model

# the keys that may hold a user's local path; made absolute when a run starts (resolve_local_paths)
LOCAL_PATH_KEYS = ("task.name", "task.data_dir", "task.validation_file", "task.test_file", "model.name_or_path")


def absolute_local_path(key: str, value: Any) -> Any:
    """`value` of a LOCAL_PATH_KEYS key made absolute when it is a local path, else as it is: 'default', a built-in
    task ('sst2') and a Hub id ('org/model') stay names, resolved wherever the run reads them."""
    if not isinstance(value, str) or not value or key not in LOCAL_PATH_KEYS:
        return value
    if key == "task.name":
        is_path = is_path_task(value)
    elif key == "model.name_or_path":
        is_path = is_local_model(value)
    else:
        is_path = True
    return os.path.abspath(os.path.expanduser(value)) if is_path else value


def resolve_local_paths(config: RunConfig) -> RunConfig:
    """Make the config's local paths absolute, in place (and return it). A data folder taken from $PEFTKIT_DATA is
    recorded as task.data_dir: read again from another folder, or where the variable is unset or relative to
    elsewhere, the run's config would otherwise name no folder and eval would read another one (or the Hub)."""
    config.task.data_dir = absolute_data_dir(config.task.data_dir)
    for key in LOCAL_PATH_KEYS:
        section, name = key.split(".")
        part = getattr(config, section)
        setattr(part, name, absolute_local_path(key, getattr(part, name)))
    return config


def absolute_data_dir(folder: str | None = None) -> str | None:
    """The data folder a run reads built-in and named tasks from (data.data_dir's rule: `folder`, else
    $PEFTKIT_DATA), absolute; None when neither is set (the Hub)."""
    root = data_dir(TaskConfig(data_dir=folder))
    return absolute_local_path("task.data_dir", str(root)) if root else None
