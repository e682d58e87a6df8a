"""``python -m gateway.envmcp`` is ``codex-app-gateway env-mcp``."""

from gateway.envmcp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
