"""`peftkit export RUN --out DIR [--merge]`: ship a run's adapter folder, or fold it into a plain full model."""

from __future__ import annotations

import argparse

HELP = "export a run's adapter (or --merge it into a full model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge", action="store_true", help="write a merged full transformers model instead")
    parser.add_argument("--allow-base-mismatch", action="store_true")


def run(args: argparse.Namespace) -> int:
    from peftkit.export import export_adapter, export_merged
    from peftkit.fingerprint import short
    from peftkit.formats import AdapterMeta

    if args.merge:
        out = export_merged(args.run_dir, args.out, allow_base_mismatch=args.allow_base_mismatch)
        print(f"wrote merged model {out} (load with transformers.AutoModelForSequenceClassification.from_pretrained)")
    else:
        out = export_adapter(args.run_dir, args.out)
        meta = AdapterMeta.read(out)
        print(
            f"wrote adapter {out} ({meta.method}, {(meta.adapter_bytes or 0) / 1024:.1f} KiB, "
            f"base {meta.base_model} fingerprint {short(meta.base_fingerprint)})"
        )
    return 0
