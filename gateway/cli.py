"""The ``codex-app-gateway`` command line: ``serve``, ``mint-token`` and the helper commands.

Usage errors exit 2 with one line naming the problem; runtime failures exit 1.

Each command imports what it needs when it runs: codex spawns ``env-mcp`` once per executor and
waits for its ``tools/list`` before a thread's first model request, so that command must not pay
for the daemon's configuration, token or web modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from gateway.version import package_version

PROG = "codex-app-gateway"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def _serve(args: argparse.Namespace) -> int:
    import trio

    from gateway.config import ConfigError, load_config, require_authenticator

    environ = dict(os.environ)
    # As upstream: the flags win when given; otherwise the environment; otherwise the default.
    if args.listen_addr is not None:
        environ["CXG_LISTEN_ADDR"] = args.listen_addr
    if args.codex_bin is not None:
        environ["CXG_CODEX_BIN"] = args.codex_bin
    try:
        config = load_config(environ)
        require_authenticator(config)
    except ConfigError as exc:
        print(f"{PROG} serve: config: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from gateway.daemon import run_daemon
    from gateway.logs import configure_logging
    from gateway.replicas.heartbeat import DuplicatePodName
    from gateway.sessions.isolation import IsolationError
    from gateway.store.base import StoreNotFenced
    from gateway.web.server import BindError

    configure_logging(config.log_level, config.log_format)
    try:
        trio.run(run_daemon, config)
    except KeyboardInterrupt:
        return EXIT_OK
    except IsolationError as exc:
        print(f"{PROG} serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BindError as exc:
        # Like a config error: the operator fixes the address (CXG_LISTEN_ADDR), no traceback.
        print(f"{PROG} serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, StoreNotFenced, DuplicatePodName) as exc:
        print(f"{PROG} serve: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def _mint_token(args: argparse.Namespace) -> int:
    from gateway.auth.tokens import TokenError, mint_hmac_token
    from gateway.config import ConfigError, resolve_secret_files

    try:
        secret = resolve_secret_files(os.environ).get("CXG_INBOUND_HMAC_SECRET", "")
    except ConfigError as exc:
        print(f"{PROG} mint-token: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not secret:
        print(
            f"{PROG} mint-token: neither CXG_INBOUND_HMAC_SECRET nor CXG_INBOUND_HMAC_SECRET_FILE "
            "is set",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        print(mint_hmac_token(secret.encode(), args.workspace, args.thread))
    except TokenError as exc:
        print(f"{PROG} mint-token: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    parser = _Parser(prog=PROG, description="Run `codex --remote` against per-workspace sessions.")
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the gateway daemon")
    serve.add_argument(
        "--listen-addr", help="HOST:PORT to listen on (env CXG_LISTEN_ADDR, default :8086)"
    )
    serve.add_argument("--codex-bin", help="the codex binary (env CXG_CODEX_BIN, default codex)")
    serve.set_defaults(handler=_serve)

    mint = commands.add_parser(
        "mint-token", help="mint a development token (needs CXG_INBOUND_HMAC_SECRET)"
    )
    mint.add_argument("--workspace", required=True, help="workspace id the token grants")
    mint.add_argument("--thread", default="dev", help="thread part of the token (default dev)")
    mint.set_defaults(handler=_mint_token)

    for register in _extra_commands():
        register(commands)
    return parser


def _extra_commands() -> list[Callable[[Any], Any]]:
    from gateway.envmcp.cli import register as register_env_mcp

    return [register_env_mcp]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m gateway``."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)
