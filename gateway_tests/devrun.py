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
from gateway.config import ConfigError, load_config, require_authenticator
from gateway.daemon import run_daemon
from gateway.logs import configure_logging
from gateway_tests.conftest import FAKES, REPO, find_real_codex
from gateway_tests.fakes.fake_model_server import FakeModelServer

DEV_MODEL_KEY = "dev-model-key"


def _instructions(listen: str, token: str, real: bool) -> str:
    host, _, port = listen.rpartition(":")
    host = host or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    codex = REPO / "tools" / "codex" / "node_modules" / ".bin" / "codex"
    codex_cmd = shlex.quote(str(codex)) if real or codex.exists() else "codex"
    return "\n".join(
        [
            "",
            "codex-app-gateway is starting (Ctrl-C drains and stops it).",
            "Connect with the real codex TUI:",
            "",
            f"  export CODEX_GATEWAY_TOKEN={token}",
            f"  {codex_cmd} --remote ws://{host}:{port} "
            "--remote-auth-token-env CODEX_GATEWAY_TOKEN",
            "",
            "(make test installs the pinned codex into tools/codex; "
            "`make run-real` uses it as the child too.)",
            "",
        ]
    )


async def _run(args: argparse.Namespace, environ: dict[str, str]) -> None:
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
            raise SystemExit(2) from None
        configure_logging(config.log_level, config.log_format)
        await run_daemon(config)
        nursery.cancel_scope.cancel()


def main() -> None:
    """Parse the Makefile's arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen-addr", default="127.0.0.1:8086")
    parser.add_argument("--workspace", default="dev")
    parser.add_argument("--run-dir", default=".run")
    parser.add_argument("--codex", choices=("fake", "real"), default="fake")
    args = parser.parse_args()

    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    print(_instructions(environ["CXG_LISTEN_ADDR"], token, args.codex == "real"), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run, args, environ)


if __name__ == "__main__":
    main()
