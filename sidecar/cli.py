"""The sidecar's own commands: serve, check-config, demo, echo-upstream.

`mm-sidecar` (mm_sidecar/cli.py) offers these and the commands that start an engine or build a
model (run, engine, make-tiny-model); this module never imports the engine (the package rule:
sidecar -> preprocess <- engine), so `python -m sidecar.cli serve` runs the sidecar alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from . import config as cfg
from .app import serve
from .ceiling import check_limit, memory_ceiling
from .echo import EchoEngine

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "sidecar.yaml"
EXIT_CONFIG = 2


def load_config(path: str) -> cfg.Config:
    try:
        return cfg.load(path)
    except cfg.ConfigError as exc:
        print(f"mm-sidecar: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(yaml.safe_dump(cfg.to_mapping(config), sort_keys=False), end="")
    ceiling = memory_ceiling(config)
    print(f"# worst-case memory of the sidecar: {cfg.format_size(ceiling.total)}", file=sys.stderr)
    print("\n".join("#" + line for line in ceiling.describe().splitlines()), file=sys.stderr)
    refusal = check_limit(config)
    if refusal is not None:
        print(f"mm-sidecar: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    upstream = config.upstream
    if upstream.mode == "offload" and upstream.engine == "vllm" and not upstream.stream_upgrade:
        print(
            "# warning: upstream.stream_upgrade is off: vLLM acks a non-streaming offloaded request only with "
            "its whole answer, so each one holds its gate slot and arena extents for its whole generation",
            file=sys.stderr,
        )
    print(f"# {args.config}: OK", file=sys.stderr)
    return 0


def checked(config: cfg.Config) -> cfg.Config:
    """`config`, or exit 2 if its memory ceiling exceeds server.memory_limit."""
    refusal = check_limit(config)
    if refusal is not None:
        print(f"mm-sidecar: {refusal}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return config


def _cmd_serve(args: argparse.Namespace) -> int:
    config = checked(load_config(args.config))
    return asyncio.run(serve(config))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # noqa: PLC0415 - PIL image generation only when asked for

    return asyncio.run(run_demo(args.url, args.engine_url or None, args.requests, args.model))


def _cmd_echo(args: argparse.Namespace) -> int:
    engine = EchoEngine(prefill_s=args.prefill_s, token_s=args.token_s, tokens=args.tokens)
    web.run_app(engine.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def add_commands(sub: Any) -> None:
    """The sidecar's own commands (none of them starts an engine or builds a model)."""
    p = sub.add_parser("serve", help="run the sidecar", formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "check-config", help="validate a config file and print the effective config", formatter_class=HelpFormatter
    )
    p.add_argument(
        "config", nargs="?", default=str(DEFAULT_CONFIG), help=f"YAML config file (default: {DEFAULT_CONFIG})"
    )
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser(
        "demo",
        help="send a mixed burst through a running sidecar and print what happened",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the sidecar's base URL")
    p.add_argument(
        "--engine-url",
        default="http://127.0.0.1:8001",
        dest="engine_url",
        help="the engine's base URL, to sample its memory ('' to skip)",
    )
    p.add_argument("--requests", type=int, default=48, help="requests in the burst, text and image mixed")
    p.add_argument("--model", default="tiny", help="the model name sent in each request")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "echo-upstream",
        help="a small OpenAI/Anthropic-compatible echo server for testing",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8001, help="TCP port")
    p.add_argument("--prefill-s", type=float, default=0.0, dest="prefill_s", help="wait before the first token")
    p.add_argument("--token-s", type=float, default=0.0, dest="token_s", help="wait between tokens")
    p.add_argument("--tokens", type=int, default=8, help="tokens in each answer")
    p.set_defaults(func=_cmd_echo)


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sidecar.cli", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse `argv` with `parser` (default: this module's commands), set up logging, run the command."""
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
