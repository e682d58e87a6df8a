"""PLACEHOLDER for the client access policy — replaced by the iso-policy branch at merge.

The tunnel calls ``ClientPolicy.check`` on every complete client→child message (text as
``str``, binary as ``bytes``): ``None`` forwards the message unchanged; a ``Refusal`` is not
forwarded, its ``response`` (a JSON-RPC error text, if any) goes to the client as a text
message, and its ``log_fields`` are logged once. This placeholder allows everything; only the
interface is real.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen
class Refusal:
    """A message the policy does not let through, and what the client and the log get."""

    response: str | None
    log_fields: Mapping[str, object] = attrs.field(factory=dict)


class ClientPolicy:
    """PLACEHOLDER: allows every message (see the module docstring)."""

    def check(self, message: str | bytes) -> Refusal | None:
        """``None`` to forward ``message``; a ``Refusal`` to drop it."""
        return None
