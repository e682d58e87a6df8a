"""This gateway's version (light on purpose: the command line and env-mcp import it at start)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """This gateway's version, from the installed package's metadata."""
    try:
        return metadata.version("codex-app-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"
