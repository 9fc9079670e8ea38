"""`mm-sidecar` commands: serve, check-config, echo-upstream, run (the main job)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import yaml
from aiohttp import web

from . import config as cfg
from .app import serve
from .ceiling import check_limit, memory_ceiling
from .echo import EchoEngine

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "sidecar.yaml"
EXIT_CONFIG = 2


def _load(path: str) -> cfg.Config:
    try:
        return cfg.load(path)
    except cfg.ConfigError as exc:
        print(f"mm-sidecar: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(yaml.safe_dump(cfg.to_mapping(config), sort_keys=False), end="")
    ceiling = memory_ceiling(config)
    print(f"# worst-case memory of the sidecar: {cfg.format_size(ceiling.total)}", file=sys.stderr)
    print("\n".join("#" + line for line in ceiling.describe().splitlines()), file=sys.stderr)
    refusal = check_limit(config)
    if refusal is not None:
        print(f"mm-sidecar: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"# {args.config}: OK", file=sys.stderr)
    return 0


def _checked(config: cfg.Config) -> cfg.Config:
    refusal = check_limit(config)
    if refusal is not None:
        print(f"mm-sidecar: {refusal}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return config


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _checked(_load(args.config))
    return asyncio.run(serve(config))


def _size(text: str) -> int:
    try:
        return cfg.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_engine(args: argparse.Namespace) -> int:
    # The one place that knows both sides: the sidecar's runtime never imports the engine.
    from engine.launch import EngineConfig, run_engine  # noqa: PLC0415

    config = EngineConfig(
        model=args.model,
        tp=args.tp,
        host=args.host,
        port=args.port,
        uds=args.uds,
        shm_dir=args.shm_dir,
        checksums=args.report_checksums,
        staging_bytes=args.staging_bytes,
    )
    return run_engine(config)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # noqa: PLC0415 - PIL image generation only when asked for

    return asyncio.run(run_demo(args.url, args.engine_url or None, args.requests, args.model))


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny import make_tiny_model  # noqa: PLC0415

    path = make_tiny_model(args.directory, seed=args.seed)
    print(f"tiny Qwen2-VL written to {path}")
    return 0


def _cmd_echo(args: argparse.Namespace) -> int:
    engine = EchoEngine(prefill_s=args.prefill_s, token_s=args.token_s, tokens=args.tokens)
    web.run_app(engine.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def _default_model_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mm-sidecar" / "tiny-qwen2-vl"


async def _wait_healthy(url: str, engine: asyncio.subprocess.Process, timeout_s: float) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
        while True:
            if engine.returncode is not None:
                raise SystemExit(f"mm-sidecar run: the engine exited with {engine.returncode} during start-up")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.5)


async def _run_main_job(config: cfg.Config, model_dir: Path) -> int:
    """The main job: the reference engine (2 ranks) and the sidecar in front of it, until Ctrl-C."""
    parts = urlsplit(config.upstream.url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        raise SystemExit(f"mm-sidecar run: upstream.url must be http://127.0.0.1:PORT, got {config.upstream.url}")
    from engine.tiny import ensure_tiny_model  # noqa: PLC0415 - the CLI is the one place that knows both

    model = await asyncio.to_thread(ensure_tiny_model, model_dir)
    print(f"model: {model}", flush=True)
    # The engine gets its own process group: Ctrl-C reaches the sidecar, which then stops the
    # engine itself, after draining its own requests (the engine must outlive them).
    engine = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", "engine", "--model", str(model), "--tp", "2",
        "--host", parts.hostname, "--port", str(parts.port), start_new_session=True,
    )  # fmt: skip
    try:
        print("starting the reference engine (2 ranks)...", flush=True)
        await _wait_healthy(config.upstream.url + config.upstream.health_path, engine, 300)

        def ready(address: str) -> None:
            print(
                f"\nmm-sidecar is serving on {address} (offload mode) in front of the reference engine on "
                f"{config.upstream.url}.\n"
                f"  try:     curl -s {address}/v1/chat/completions -H 'content-type: application/json' "
                '-d \'{"model":"tiny","max_tokens":8,"messages":[{"role":"user","content":'
                '[{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4'
                'nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"}},{"type":"text","text":"hi"}]}]}\'\n'
                f"  metrics: {address}{config.metrics.path}\n"
                f"  demo:    .venv/bin/mm-sidecar demo --url {address}\n"
                "  Ctrl-C stops everything.\n",
                flush=True,
            )

        return await serve(config, ready=ready)
    finally:
        if engine.returncode is None:
            engine.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(engine.wait(), 30)
            except TimeoutError:
                engine.kill()
                await engine.wait()


def _cmd_run(args: argparse.Namespace) -> int:
    config = _checked(_load(args.config))
    if args.port is not None:
        config = replace(config, server=replace(config.server, port=args.port))
    return asyncio.run(_run_main_job(config, Path(args.model) if args.model else _default_model_dir()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-sidecar", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the sidecar")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and print the effective config")
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("run", help="the main job: the reference engine and the sidecar in offload mode")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--port", type=int, default=None, help="override server.port")
    p.add_argument("--model", default=None, help="engine checkpoint (default: a tiny Qwen2-VL, built if missing)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("engine", help="the reference torch engine (tensor parallel ranks, offload protocol)")
    p.add_argument("--model", required=True, help="a Qwen2-VL-family checkpoint directory")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (default 2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--uds", default=None, help="serve on this unix socket instead of TCP")
    p.add_argument("--shm-dir", default="/dev/shm", dest="shm_dir")
    p.add_argument(
        "--report-checksums",
        action="store_true",
        dest="report_checksums",
        help="answer x-mm-tensor-sha256 with each rank's checksums of the tensors it received (tests)",
    )
    p.add_argument(
        "--staging-bytes",
        type=_size,
        default=256 << 20,
        dest="staging_bytes",
        help="warm host memory each rank keeps for handed-off tensors, in use and cached (default 256MiB)",
    )
    p.set_defaults(func=_cmd_engine)

    p = sub.add_parser("demo", help="send a mixed burst through a running sidecar and print what happened")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the sidecar")
    p.add_argument("--engine-url", default="http://127.0.0.1:8001", dest="engine_url", help="'' to skip its memory")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--model", default="tiny")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight Qwen2-VL checkpoint (tests, demo)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny_model)

    p = sub.add_parser("echo-upstream", help="a small OpenAI/Anthropic-compatible echo server for testing")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--prefill-s", type=float, default=0.0, dest="prefill_s")
    p.add_argument("--token-s", type=float, default=0.0, dest="token_s")
    p.add_argument("--tokens", type=int, default=8)
    p.set_defaults(func=_cmd_echo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
