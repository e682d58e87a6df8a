"""Model credentials: the workspace's ModelServer token, kept fresh for the running child."""

from gateway.credentials.modelserver import (
    ModelServerClient,
    ModelServerError,
    ModelServerProtocolError,
    ModelServerToken,
    ModelServerUnavailable,
)
from gateway.credentials.session import SessionModelCredentials

__all__ = [
    "ModelServerClient",
    "ModelServerError",
    "ModelServerProtocolError",
    "ModelServerToken",
    "ModelServerUnavailable",
    "SessionModelCredentials",
]
