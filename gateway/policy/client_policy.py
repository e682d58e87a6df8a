"""``ClientPolicy``: one pure check per client→child WebSocket message.

A text message is parsed once by the standard ``json`` decoder (no prefilter on the raw text:
JSON escapes such as ``"\\u0066s/readFile"`` would defeat it) and then looked up by method:

* a method in ``methods.PLAIN`` is forwarded; one in ``methods.CHECKED`` is forwarded when its
  parameters pass ``checks.CHECKS``; every other method (unknown, or one that runs processes,
  installs plugins, rewrites providers, logs in, uploads …) is refused, unless the operator
  lists it in ``CXG_POLICY_EXTRA_METHODS``; ``CXG_POLICY_DENY_METHODS`` refuses any method.
* responses (to the child's approval requests) are forwarded; notifications other than
  ``initialized`` are dropped.
* what codex 0.169.0 would silently ignore — invalid JSON, batches (arrays), duplicate keys,
  nesting deeper than the parser takes — is refused with a clear error instead, so that the
  gateway and codex can never read one message two ways.
* binary messages are forwarded unparsed: codex 0.169.0 ignores binary frames (checked: a
  JSON request in a binary frame gets no answer and has no effect). ``reads_binary`` says so
  to the relay, which then does not unmask them for ``check``.

The policy does no I/O; the relay sends ``Refusal.response`` to the client, logs
``Refusal.log_fields`` and counts the refusal by rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, ClassVar

import attrs

from gateway.config import Config, PolicySettings
from gateway.policy import checks, methods

# JSON-RPC error codes: -32700 parse error, -32600 invalid request (what codex itself answers
# when its requirements refuse a sandbox or approval choice).
PARSE_ERROR = -32700
REFUSED = -32600


@attrs.frozen
class Refusal:
    """A message not forwarded: what to answer the client (None for a notification) and log."""

    rule: str
    response: str | None
    log_fields: Mapping[str, Any]


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey
    return result


# One decoder for every message: ``json.loads`` with a hook builds a new one per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _matches(method: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern == method or (pattern.endswith("/*") and method.startswith(pattern[:-1])):
            return True
    return False


@attrs.frozen
class ClientPolicy:
    """The operator's bounds for one session's clients; ``check`` each client message."""

    settings: PolicySettings
    home: PurePosixPath = attrs.field(converter=PurePosixPath)
    codex_home: PurePosixPath = attrs.field(converter=PurePosixPath)
    provider: str
    _context: checks.Context = attrs.field(init=False)
    # Binary messages are forwarded without being read (see the module docstring), so the relay
    # need not unmask them for ``check``; a policy that reads them says so here.
    reads_binary: ClassVar[bool] = False

    def __attrs_post_init__(self) -> None:
        context = checks.Context(
            settings=self.settings,
            roots=checks.Roots(home=self.home, codex_home=self.codex_home),
            provider=self.provider,
        )
        object.__setattr__(self, "_context", context)

    @classmethod
    def for_session(cls, config: Config, *, home: str, codex_home: str) -> ClientPolicy:
        """The policy of one session: ``config``'s settings and that session's roots."""
        return cls(
            settings=config.policy, home=home, codex_home=codex_home, provider=config.model.provider
        )

    def check(self, message: str | bytes) -> Refusal | None:
        """None to forward ``message`` unchanged, or the refusal to answer instead."""
        if not isinstance(message, str):
            return None
        try:
            parsed = _DECODER.decode(message)
        except _DuplicateKey:
            return _refuse("duplicate_key", None, None, REFUSED, "a JSON object repeats a key")
        except RecursionError:
            return _refuse("too_deep", None, None, REFUSED, "the message is nested too deeply")
        except ValueError:
            return _refuse("not_json", None, None, PARSE_ERROR, "the message is not valid JSON")
        if isinstance(parsed, list):
            return _refuse("batch", None, None, REFUSED, "batches (JSON arrays) are not supported")
        if not isinstance(parsed, dict):
            return _refuse("malformed", None, None, REFUSED, "a message must be a JSON object")
        return self._check_message(parsed)

    def _check_message(self, message: dict[str, Any]) -> Refusal | None:
        has_id = "id" in message
        request_id = message.get("id")
        if has_id and (isinstance(request_id, bool) or not isinstance(request_id, (int, str))):
            return _refuse("malformed", None, None, REFUSED, "id must be a string or an integer")
        method = message.get("method")
        if method is None and "method" not in message:
            if has_id and ("result" in message or "error" in message):
                return None  # the client's answer to one of the child's requests
            return _refuse("malformed", request_id, None, REFUSED, "a message needs a method")
        if not isinstance(method, str):
            return _refuse("malformed", request_id, None, REFUSED, "method must be a string")
        reply_to = request_id if has_id else _NOTIFICATION
        if _matches(method, self.settings.deny_methods):
            return _refuse(
                "method_denied",
                reply_to,
                method,
                REFUSED,
                f"{method} is switched off on this gateway",
                "CXG_POLICY_DENY_METHODS",
            )
        if not has_id:
            if method in methods.NOTIFICATIONS or _matches(method, self.settings.extra_methods):
                return None
            return _refuse("method_not_allowed", _NOTIFICATION, method, REFUSED, "")
        if method in methods.PLAIN:
            return None
        check = checks.CHECKS.get(method)
        if check is None:
            if _matches(method, self.settings.extra_methods):
                return None
            return _refuse(
                "method_not_allowed",
                request_id,
                method,
                REFUSED,
                f"{method} is not allowed through this gateway",
                "CXG_POLICY_EXTRA_METHODS",
            )
        params = message.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return _refuse(
                "malformed", request_id, method, REFUSED, f"{method} params must be an object"
            )
        violation = check(self._context, params)
        if violation is None:
            return None
        return _refuse(
            violation.rule, request_id, method, REFUSED, violation.message, violation.setting
        )


_NOTIFICATION = object()


def _refuse(
    rule: str,
    request_id: object,
    method: str | None,
    code: int,
    message: str,
    setting: str = "",
) -> Refusal:
    """A refusal; ``request_id`` is ``_NOTIFICATION`` when nothing may be answered."""
    named = f" ({setting})" if setting else ""
    text = f"refused by the gateway's policy{named}: {message}"
    response = None
    if request_id is not _NOTIFICATION:
        error: dict[str, Any] = {"code": code, "message": text, "data": {"rule": rule}}
        if setting:
            error["data"]["setting"] = setting
        response = json.dumps({"id": request_id, "error": error})
    fields: dict[str, Any] = {"rule": rule, "method": method, "reason": message[:300]}
    if setting:
        fields["setting"] = setting
    return Refusal(rule=rule, response=response, log_fields=fields)
