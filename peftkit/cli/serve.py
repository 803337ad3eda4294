"""`peftkit serve --adapter NAME=DIR ...`: many adapters on one base model over HTTP."""

from __future__ import annotations

import argparse

from peftkit.cli.predict import add_bf16_argument
from peftkit.errors import PeftkitError

HELP = "serve many adapters on one base model over HTTP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="default")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--admin-token", help="enables POST/DELETE /v1/adapters with this bearer token")
    parser.add_argument("--max-batch", type=int, default=64, help="most texts in one request")
    parser.add_argument("--max-chars", type=int, default=10000, help="longest text accepted")
    parser.add_argument("--allow-base-mismatch", action="store_true")
    add_bf16_argument(parser)


def parse_adapter_args(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise PeftkitError(f"--adapter {value!r} must be NAME=DIR")
        if name in out:
            raise PeftkitError(f"--adapter name {name!r} given twice")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from peftkit.precision import precision_name
    from peftkit.serve import create_app

    if args.max_batch < 1 or args.max_chars < 1:
        raise PeftkitError("--max-batch and --max-chars must be at least 1")
    if not 0 <= args.port <= 65535:  # checked before the adapters load, not by the socket after
        raise PeftkitError(f"--port must be 0..65535, got {args.port}")
    app = create_app(
        args.base,
        parse_adapter_args(args.adapter),
        admin_token=args.admin_token,
        max_batch=args.max_batch,
        max_chars=args.max_chars,
        allow_base_mismatch=args.allow_base_mismatch,
        bf16=args.bf16,
    )
    adapters = ", ".join(parse_adapter_args(args.adapter)) or "none yet (POST /v1/adapters)"
    precision = precision_name(app.state.pool.bf16)
    print(
        f"peftkit serve: base {args.base}; adapters: {adapters}; precision: {precision}; "
        "POST /v1/classify, GET /v1/adapters",
        flush=True,
    )
    # uvicorn's own start-up lines say where it listens (the real port, also for --port 0); no line per request
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0
