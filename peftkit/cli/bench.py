"""`peftkit bench`: train the grid of tasks x methods x seeds and write tables and plots (or only --report them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.user_metrics import METRIC_HELP

HELP = "train methods x tasks and write accuracy/params/memory/time tables"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", help="comma-separated tasks (default: the profile's)")
    parser.add_argument("--methods", help="comma-separated methods (default: the profile's)")
    parser.add_argument(
        "--profile",
        default="quick",
        help="a profile name (see recipes/profiles/): smoke, quick, converged, full; or your own profile's .yaml file",
    )
    parser.add_argument("--seeds", help="comma-separated seeds (default: the profile's)")
    parser.add_argument("--out", help="results folder (default: benchmarks/results/<profile>)")
    parser.add_argument("--data-dir")
    parser.add_argument("--model", help="base model (default: the recipes')")
    parser.add_argument("--report", metavar="DIR", help="only rebuild tables and plots from the cell files in DIR")
    parser.add_argument(
        "--executor",
        choices=("local", "ray", "slurm"),
        default="local",
        help="where cells train: one at a time here (default), Ray tasks, or Slurm jobs (submitit)",
    )
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray cluster)")
    parser.add_argument("--cpus-per-cell", type=float, help="CPUs each Ray task / Slurm job asks for (default 1)")
    parser.add_argument("--gpus-per-cell", type=float, help="GPUs each Ray task / Slurm job asks for (default 0)")
    parser.add_argument("--slurm-partition", help="Slurm partition for --executor slurm")
    parser.add_argument("--metric", action="append", default=[], metavar="PATH_OR_ID", help=METRIC_HELP)


# the flags that shape a grid run (in the order command_line writes them); --report uses none of them
GRID_FLAGS = (
    "tasks",
    "methods",
    "seeds",
    "out",
    "data_dir",
    "model",
    "address",
    "cpus_per_cell",
    "gpus_per_cell",
    "slurm_partition",
)


def parse_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def parse_seeds(value: str | None) -> list[int] | None:
    try:
        return None if value is None else [int(s) for s in parse_list(value)]
    except ValueError:
        raise PeftkitError(f"--seeds must be comma-separated integers, got {value!r}") from None


def given_grid_flags(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(--flag, value) for each grid flag the user gave, in GRID_FLAGS order."""
    return [(f"--{flag.replace('_', '-')}", getattr(args, flag)) for flag in GRID_FLAGS if getattr(args, flag)]


def command_line(args: argparse.Namespace) -> str:
    """The bench command as typed (flags in a fixed order), for the manifest and results.md."""
    parts = ["peftkit", "bench", "--profile", args.profile]
    for flag, value in given_grid_flags(args):
        parts += [flag, str(value)]
    if args.executor != "local":
        parts += ["--executor", args.executor]
    for spec in args.metric:
        parts += ["--metric", spec]
    return " ".join(parts)


def refuse_grid_flags_with_report(args: argparse.Namespace) -> None:
    """--report rebuilds DIR's tables in DIR from DIR's cells: a flag it would ignore (--out above all, which reads
    as "write the report there") is refused rather than silently dropped."""
    ignored = [flag for flag, _ in given_grid_flags(args)]
    ignored += ["--executor"] if args.executor != "local" else []
    ignored += ["--metric"] if args.metric else []
    if ignored:
        raise PeftkitError(
            f"{', '.join(ignored)} cannot be combined with --report DIR, which rebuilds the tables inside DIR from "
            "its cells alone; to write them elsewhere, copy DIR and --report the copy"
        )


def run(args: argparse.Namespace) -> int:
    from peftkit.bench import build_report, run_bench
    from peftkit.bench.executors import make_executor
    from peftkit.bench.profiles import profile_stem

    if args.report:
        refuse_grid_flags_with_report(args)
        report = build_report(args.report)
        files, reported = report["environment"]["cell_files"], len(report["cells"])
        chosen = f" ({reported} at the chosen learning rates)" if reported != files else ""
        print(f"rebuilt {Path(args.report) / 'results.md'} from {files} cell files{chosen}")
        return 0
    out = Path(args.out or f"benchmarks/results/{profile_stem(args.profile)}")
    executor = make_executor(
        args.executor, out, args.address, args.cpus_per_cell, args.gpus_per_cell, args.slurm_partition
    )
    counts = run_bench(
        args.profile,
        parse_list(args.tasks),
        parse_list(args.methods),
        parse_seeds(args.seeds),
        args.out,
        args.model,
        args.data_dir,
        progress=True,
        command=command_line(args),
        executor=executor,
        user_metrics=args.metric,
    )
    retried = f": {counts['retried']} retried after failing before" if counts["retried"] else ""
    print(
        f"bench {profile_stem(args.profile)}: {counts['planned']} cells ({counts['skipped']} already done, "
        f"{counts['ran']} run now{retried}), {counts['failed']} failed; tables: {out / 'results.md'}"
    )
    return 1 if counts["failed"] else 0
