"""Paths the model gives, resolved as the shell tool resolves its ``cwd``.

Absolute, ``~``-relative (the executor's home), or relative to the executor's working directory
(from ``initialize``); normalised, and sent to exec-server 0.169.0 as the ``file://`` URI it
requires. A ``file:///…`` URI is accepted as the path it names; one with a host is refused.
Traversal (``..``) is not refused: the executor is the user's own machine, reachable as a whole
through the shell tool, so a path is an address, not a permission.
"""

from __future__ import annotations

import posixpath
from urllib.parse import unquote, urlsplit

import attrs

from gateway.envmcp.bridge import EnvironmentInfo
from gateway.envmcp.shell import resolve_cwd
from gateway.envmcp.tools.arguments import plain_path


@attrs.frozen
class ExecutorPath:
    """A resolved path: the URI for the exec-server and the absolute path for people."""

    uri: str
    path: str

    @property
    def parent(self) -> ExecutorPath:
        parent = posixpath.dirname(self.path) or "/"
        return ExecutorPath(uri=_uri_of(parent), path=parent)


def _uri_of(path: str) -> str:
    return resolve_cwd(path, EnvironmentInfo())


def resolve_path(value: str, info: EnvironmentInfo, name: str = "path") -> ExecutorPath:
    """Resolve ``value`` on the executor described by ``info``; ``ValueError`` if it cannot be."""
    uri = resolve_cwd(plain_path(value, name), info)
    path = unquote(urlsplit(uri).path) or "/"
    return ExecutorPath(uri=uri, path=path)
