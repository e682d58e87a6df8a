"""``make run`` and ``make run-real``: the daemon on the embedded defaults, ready to connect to.

``--codex fake`` runs sessions with the fake codex (no model, instant). ``--codex real`` runs
the pinned real codex against a local fake model server (Responses API), so a person can hold a
conversation in the real TUI without any account or network. State lives under ``--run-dir``:
the sessions' directories and the local object store, kept between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import sys
from pathlib import Path

import trio

from gateway.auth.tokens import mint_hmac_token
from gateway.config import Config, ConfigError, load_config, require_authenticator
from gateway.daemon import run_daemon
from gateway.logs import configure_logging
from gateway.sessions.isolation import IsolationError
from gateway.web.server import BindError
from gateway_tests.conftest import FAKES, REPO, find_real_codex
from gateway_tests.fakes.fake_model_server import FakeModelServer

DEV_MODEL_KEY = "dev-model-key"


TOKEN_VAR = "CODEX_GATEWAY_TOKEN"
# The pinned real codex the Makefile installs (npm ci in tools/codex); its launcher runs the
# native binary of this platform.
PINNED_CODEX = REPO / "tools" / "codex" / "node_modules" / ".bin" / "codex"


def connect_command(url: str, token: str) -> str:
    """The shell command that opens the pinned real TUI on ``url`` with ``token``.

    One line that works as printed from any directory: the token is set for that command only,
    and codex is named by its absolute path, so nothing has to be on PATH or exported first.
    """
    host, _, port = url.removeprefix("http://").rpartition(":")
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return (
        f"{TOKEN_VAR}={shlex.quote(token)} {shlex.quote(str(PINNED_CODEX))} "
        f"--remote ws://{host}:{port} --remote-auth-token-env {TOKEN_VAR}"
    )


def instructions(url: str, token: str, workspace: str) -> str:
    """What ``make run`` prints once the gateway listens."""
    return "\n".join(
        [
            "",
            f"codex-app-gateway is serving workspace {workspace!r} on {url} "
            "(Ctrl-C drains and stops it).",
            "Connect with the real codex TUI (another terminal, any directory):",
            "",
            f"  {connect_command(url, token)}",
            "",
        ]
    )


async def _run(args: argparse.Namespace, environ: dict[str, str], token: str) -> int:
    """Serve until drained; returns the exit status (2 for a config or bind error)."""
    async with trio.open_nursery() as nursery:
        if args.codex == "real":
            model = FakeModelServer(
                accept=lambda token: token == DEV_MODEL_KEY,
                default_text="Hello from the local fake model: the gateway, the session and "
                "the real codex are all working.",
            )
            model_url: str = await nursery.start(model.serve)
            environ["CXG_MODEL_PROVIDER_BASE_URL"] = f"{model_url}/v1"
            environ["CXG_CODEX_API_KEY"] = DEV_MODEL_KEY
            environ.setdefault("CXG_MODEL", "fake-model")
        try:
            config = load_config(environ)
            require_authenticator(config)
        except ConfigError as exc:
            print(f"make run: config: {exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 2
        configure_logging(config.log_level, config.log_format)
        try:
            urls: list[str] = await nursery.start(_serve, config, nursery.cancel_scope)
        except (BindError, IsolationError) as exc:
            print(f"make run: {exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()
            return 2
        # Only now that the port is bound: the command to connect.
        print(instructions(urls[0], token, args.workspace), flush=True)
    return 0


async def _serve(
    config: Config, done: trio.CancelScope, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    """The daemon until it has drained; then the fake model server goes too."""
    await run_daemon(config, task_status=task_status)
    done.cancel()


def main() -> None:
    """Parse the Makefile's arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen-addr", default="127.0.0.1:8086")
    parser.add_argument("--workspace", help="default: dev (fake codex) or dev-real (real)")
    parser.add_argument("--run-dir", help="default: .run/fake or .run/real")
    parser.add_argument("--codex", choices=("fake", "real"), default="fake")
    args = parser.parse_args()
    # The fake and the real codex never share a workspace or a store: the fake's files must
    # not end up in a real child's CODEX_HOME archive.
    args.workspace = args.workspace or ("dev-real" if args.codex == "real" else "dev")
    run_dir = Path(args.run_dir or f".run/{args.codex}").resolve()
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Passable, not listable: where the gateway runs children under their own uids (as root),
    # they must reach their session directories below this one.
    run_dir.chmod(0o711)
    environ = dict(os.environ)
    secret = environ.setdefault("CXG_INBOUND_HMAC_SECRET", secrets.token_hex(32))
    environ.setdefault("CXG_LISTEN_ADDR", args.listen_addr)
    environ.setdefault("CXG_TMP_ROOT", str(run_dir / "sessions"))
    environ.setdefault("CXG_LOCAL_STORE_DIR", str(run_dir / "store"))
    environ.setdefault("CXG_LOG_FORMAT", "text")
    codex_bin = find_real_codex() if args.codex == "real" else FAKES / "codex"
    environ.setdefault("CXG_CODEX_BIN", str(codex_bin))
    # The fake codex's own test methods (fake/echo, ...) pass the protocol policy.
    environ.setdefault("CXG_POLICY_EXTRA_METHODS", "fake/*")

    token = mint_hmac_token(secret.encode(), args.workspace)
    status = 0
    with contextlib.suppress(KeyboardInterrupt):
        status = trio.run(_run, args, environ, token)
    sys.exit(status)


if __name__ == "__main__":
    main()
