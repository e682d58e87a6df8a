"""``codex-app-gateway env-mcp``: flags, the token from the environment, and the exit codes.

Usage errors exit 2 with one line on stderr (``codex-app-gateway env-mcp: <what is wrong>``);
runtime failures exit 1; stdin closing is a clean exit 0. Logs go to stderr only, because
stdout carries the MCP frames codex reads.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

import trio

PROG = "codex-app-gateway env-mcp"
DEFAULT_TIME_LIMIT = 50.0

log = logging.getLogger(__name__)

DESCRIPTION = (
    "MCP stdio server for a session's executors (spawned by codex from config.toml): with "
    "--channel-env, `list_environments` and tools that take an environment id, asking the "
    "session for the live executor list and per-call tokens; with --exe-id, --bridge-url and "
    "--token-env, a `shell` tool for that one executor. Commands run on the executor through "
    "the exec gateway's bridge."
)
_FIXED_FLAGS = ("exe_id", "bridge_url", "token_env")


def _non_empty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _bridge_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"must be a ws:// or wss:// URL, got {value!r}")
    return value


def _env_name(value: str) -> str:
    if not value or "=" in value or "\x00" in value:
        raise argparse.ArgumentTypeError(f"must name an environment variable, got {value!r}")
    return value


def _time_limit(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value!r}")
    return seconds


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.exit(2, f"{PROG}: {message}\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add env-mcp's flags to ``parser`` and make its usage errors one line, exit 2."""
    parser.add_argument(
        "--channel-env",
        type=_env_name,
        help="name of the environment variable holding the session's executor channel "
        "(a unix socket path): the multiplexed layout",
    )
    parser.add_argument("--exe-id", type=_non_empty, help="executor id (per-executor layout)")
    parser.add_argument(
        "--bridge-url",
        type=_bridge_url,
        help="the exec gateway's bridge for this executor (ws[s]://…/bridge/<exe_id>)",
    )
    parser.add_argument(
        "--token-env",
        type=_env_name,
        help="name of the environment variable holding the capability token",
    )
    parser.add_argument(
        "--exe-desc", default="", help="how the tool describes the executor (default: its id)"
    )
    parser.add_argument("--turn-id", default="", help="turn id the token was minted for (logs)")
    parser.add_argument(
        "--timeout",
        type=_time_limit,
        default=DEFAULT_TIME_LIMIT,
        metavar="SECONDS",
        help=f"time limit of one shell command; it is killed then (default {DEFAULT_TIME_LIMIT:g})",
    )
    # argparse prints usage plus a message; the product's rule is one clear line.
    parser.error = lambda message: _one_line_error(parser, message)  # type: ignore[method-assign]
    # ``handler`` is what gateway.cli dispatches on; ``func`` is the argparse convention.
    parser.set_defaults(handler=run, func=run)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``env-mcp`` subcommand to ``subparsers`` (from ``add_subparsers()``).

    The parsed namespace carries ``handler`` (and ``func``, the same): call
    ``args.handler(args)`` and exit with its result.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "env-mcp", help="MCP stdio server for a session's executors", description=DESCRIPTION
    )
    add_arguments(parser)
    return parser


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # codex passes its own environment on; the daemon's level applies when it is there.
    level = os.environ.get("CXG_LOG_LEVEL", "info").strip().lower()
    root.setLevel(_LEVELS.get(level, logging.INFO))


def _layout_error(args: argparse.Namespace) -> str | None:
    """Either ``--channel-env`` alone or all three per-executor flags (upstream's order)."""
    given = [name for name in _FIXED_FLAGS if getattr(args, name, None) is not None]
    if args.channel_env is not None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            return f"--channel-env cannot be combined with {flags}"
        return None
    for name in _FIXED_FLAGS:
        if name not in given:
            return f"--{name.replace('_', '-')} is required (or --channel-env)"
    return None


def run(args: argparse.Namespace) -> int:
    """Serve MCP on stdio for the executors in ``args``; return the process exit code."""
    from gateway.envmcp.server import ChannelSettings, EnvMcpSettings

    problem = _layout_error(args)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    _configure_logging()
    settings: EnvMcpSettings | ChannelSettings
    if args.channel_env is not None:
        path = os.environ.get(args.channel_env, "")
        if not path:
            print(
                f"{PROG}: env var {args.channel_env} is empty; cannot reach the session",
                file=sys.stderr,
            )
            return 1
        settings = ChannelSettings(channel_path=path, time_limit=args.timeout)
        return _serve(settings)
    token = os.environ.get(args.token_env, "")
    if not token:
        print(
            f"{PROG}: env var {args.token_env} is empty; cannot authenticate to bridge",
            file=sys.stderr,
        )
        return 1
    settings = EnvMcpSettings(
        exe_id=args.exe_id,
        bridge_url=args.bridge_url,
        token=token,
        exe_desc=args.exe_desc.strip() or args.exe_id,
        turn_id=args.turn_id,
        time_limit=args.timeout,
    )
    return _serve(settings)


def _serve(settings: Any) -> int:
    from gateway.envmcp.server import serve

    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.error("mcp serve: %s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.envmcp [env-mcp] …``: the subcommand on its own.

    A leading ``env-mcp`` is accepted, so ``(python, "-m", "gateway.envmcp")`` works as the
    gateway's self command, to which the config.toml entries append ``env-mcp`` and the flags.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["env-mcp"]:
        arguments = arguments[1:]
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(arguments)
    return int(args.handler(args))
