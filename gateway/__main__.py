"""``python -m gateway`` is the ``codex-app-gateway`` command."""

from gateway.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
