"""Turns with the real codex 0.169.0 as the child and no reachable model.

A turn records the user message in the thread's rollout, then keeps retrying the unreachable
model until it is interrupted: exactly what the persistence tests need of a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway_tests.harness import Rpc

# A generous bound for one step of a real codex on a busy machine; each normally takes ~1 s.
STEP_TIMEOUT = 30.0


def is_user_message(text: str) -> Callable[[dict[str, Any]], bool]:
    """Whether an ``item/completed`` notification is the user message ``text``."""

    def check(message: dict[str, Any]) -> bool:
        item = message["params"]["item"]
        return item.get("type") == "userMessage" and any(
            part.get("text") == text for part in item.get("content", [])
        )

    return check


async def record_user_message(rpc: Rpc, thread_id: str, text: str) -> dict[str, Any]:
    """Start a turn with ``text``, wait until codex has recorded it, interrupt the turn.

    Returns the turn as ``turn/completed`` reports it (its status is ``interrupted``).
    """
    turn = (
        await rpc.result(
            "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
        )
    )["turn"]
    await rpc.wait_for("item/completed", is_user_message(text))
    await rpc.result("turn/interrupt", {"threadId": thread_id, "turnId": turn["id"]})
    completed = await rpc.wait_for(
        "turn/completed", lambda message: message["params"]["turn"]["id"] == turn["id"]
    )
    ended: dict[str, Any] = completed["params"]["turn"]
    return ended
