"""The `gradiag` command line: `gradiag serve` runs the service under gunicorn;
`gradiag check FILE...` diagnoses files (service.check)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from gradiag.service.check import add_check_arguments, run_check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradiag", description="Gradient diagnostics.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service under gunicorn")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000 or $PORT)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes")
    check = commands.add_parser(
        "check",
        help="diagnose graph, expression or network JSON files (exit 0/1/2/3)",
        description="Diagnose graph, expression or network files, in process or via --url. "
        "Exit 0 healthy, 1 fail (or warn with --strict), 2 bad file/4xx/usage, "
        "3 service unreachable or 5xx.",
    )
    add_check_arguments(check)
    return parser


def serve(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    for name, value in (("HOST", args.host), ("PORT", args.port), ("WORKERS", args.workers)):
        if value is not None:
            env[f"GRADIAG_{name}"] = str(value)
    from gradiag.service.config import ConfigError, Settings

    missing = [name for name in ("flask", "gunicorn") if not _importable(name)]
    if missing:
        print(
            f"gradiag: serving needs the server extra ({missing[0]} is not installed): "
            "pip install 'gradiag[server]'",
            file=sys.stderr,
        )
        return 2
    try:
        Settings.from_env(env)  # refuse a bad setting before any worker starts
    except ConfigError as err:
        print(f"gradiag: {err}", file=sys.stderr)
        return 2
    argv = [
        sys.executable, "-m", "gunicorn",
        "-c", "python:gradiag.service.gunicorn_conf",
        "gradiag.service:create_app()",
    ]  # fmt: skip
    os.execvpe(sys.executable, argv, env)
    return 0  # not reached


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules (the tests' stand-in)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "check":
        return run_check(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
