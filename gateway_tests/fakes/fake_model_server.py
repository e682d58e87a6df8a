"""An in-process fake Responses-API model server, for tests and live demos.

Enough of the OpenAI Responses API for the real codex 0.169.0 to run turns
(``reference/codex-protocol.md`` §11):

* ``POST {base}/responses`` (any prefix, e.g. ``/v1/responses``) answers with server-sent events:
  ``response.created``, ``response.output_item.added``, ``response.output_text.delta``,
  ``response.output_item.done`` and ``response.completed`` (with ``usage``) for a text reply; or
  one ``function_call`` output item for a scripted tool call.
* ``GET {base}/models`` answers a model list (codex logs an error if it fails; turns still work).

Authorization: every request's bearer token goes through ``accept`` (a callable the test gives,
e.g. ``lambda token: agentserver.token_valid("ws1", token)``); a refused request gets 401 with
an OpenAI-style error body. Every request is recorded (``requests``) with its Authorization
header, its JSON body and the status it got, whether accepted or not.

Scripting: ``script`` is a queue of replies consumed by accepted ``/responses`` requests, oldest
first; when it is empty ``default_text`` is answered. A reply is a :class:`TextReply`, a
:class:`FunctionCallReply`, a :class:`ErrorReply`, or a plain dict
(``{"text": "..."}``, ``{"function_call": {"namespace": "mcp__exe_a", "name": "shell",
"arguments": {...}}}``, ``{"error_status": 500}``). After a function call, codex sends the
tool's result on its next request; read it with :func:`function_call_outputs`.

Usage::

    model = FakeModelServer(accept=lambda token: token == "sk-test")
    model.script.append({"function_call": {"namespace": "mcp__exe_a", "name": "shell",
                                           "arguments": {"command": "echo hi"}}})
    async with trio.open_nursery() as nursery:
        base = await nursery.start(model.serve)      # http://127.0.0.1:PORT
        provider_base_url = f"{base}/v1"
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway_tests.fakes.serving import serve_on_loopback


@attrs.frozen
class TextReply:
    """An assistant message; ``hold`` (if given) is awaited before ``response.completed``."""

    text: str
    hold: trio.Event | None = None


@attrs.frozen
class FunctionCallReply:
    """A call of MCP tool ``name`` of server ``namespace`` (``mcp__<server>``)."""

    namespace: str | None
    name: str
    arguments: Mapping[str, Any] | str
    call_id: str | None = None


@attrs.frozen
class ErrorReply:
    """A plain HTTP error instead of a stream (e.g. 500 to exercise codex's retries)."""

    status: int = 500
    message: str = "scripted failure"


Reply = TextReply | FunctionCallReply | ErrorReply | Mapping[str, Any]


@attrs.define
class ModelRequest:
    """One request the fake received."""

    method: str
    path: str
    authorization: str | None
    headers: dict[str, str]
    body: Any  # decoded JSON, or None
    status: int = 0

    @property
    def token(self) -> str | None:
        """The bearer token, or None when there is no ``Bearer`` Authorization header."""
        return bearer_token(self.authorization)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if authorization is None or not authorization.startswith("Bearer "):
        return None
    return authorization[len("Bearer ") :]


def function_call_outputs(body: Any) -> list[dict[str, Any]]:
    """The ``function_call_output`` items of a Responses request body's ``input``."""
    items = body.get("input", []) if isinstance(body, dict) else []
    return [i for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]


DEFERRED_NAMESPACES_HEADING = "Deferred tool namespaces:"


def announced_mcp_namespaces(body: Any) -> set[str]:
    """The ``mcp__<server>`` namespaces a Responses request offers the model, in either form.

    codex 0.169.0 lists an MCP server as a ``{"type": "namespace", "name": "mcp__<server>"}``
    entry of ``tools``, or — for models with tool search — as a line ``- mcp__<server>`` under
    ``Deferred tool namespaces:`` in a developer message of ``input`` (codex-protocol.md §12).
    """
    if not isinstance(body, dict):
        return set()
    found = {
        tool["name"]
        for tool in body.get("tools") or []
        if isinstance(tool, dict) and tool.get("type") == "namespace" and "name" in tool
    }
    for item in body.get("input") or []:
        if not (isinstance(item, dict) and item.get("role") == "developer"):
            continue
        content = item.get("content")
        parts = [content] if isinstance(content, str) else content or []
        for part in parts:
            text = part if isinstance(part, str) else part.get("text", "")
            if not isinstance(text, str) or DEFERRED_NAMESPACES_HEADING not in text:
                continue
            # "- mcp__exe_alpha" or "- other_namespace: what it does", one per line.
            for line in text.split(DEFERRED_NAMESPACES_HEADING, 1)[1].splitlines()[1:]:
                if not line.startswith("- "):
                    break
                found.add(line[2:].split(":", 1)[0].strip())
    return {name for name in found if name.startswith("mcp__")}


def output_text(item: Mapping[str, Any]) -> str:
    """The text of a ``function_call_output`` item (a string, or a list of ``input_text``)."""
    output = item.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(p.get("text", "") for p in output if isinstance(p, dict))
    return ""


def _normalise(reply: Reply) -> TextReply | FunctionCallReply | ErrorReply:
    if isinstance(reply, TextReply | FunctionCallReply | ErrorReply):
        return reply
    if "text" in reply:
        return TextReply(str(reply["text"]))
    if "function_call" in reply:
        call = reply["function_call"]
        return FunctionCallReply(
            namespace=call.get("namespace"),
            name=call["name"],
            arguments=call.get("arguments", {}),
            call_id=call.get("call_id"),
        )
    if "error_status" in reply:
        return ErrorReply(int(reply["error_status"]), str(reply.get("message", "scripted")))
    raise ValueError(f"unknown scripted reply {reply!r}")


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


class FakeModelServer:
    """A Responses-API server on 127.0.0.1 with a free port; see the module docstring."""

    def __init__(
        self,
        accept: Callable[[str], bool] | None = None,
        *,
        default_text: str = "Hello from the fake model.",
        models: tuple[str, ...] = ("gpt-5.5",),
    ) -> None:
        #: Decides whether a bearer token is currently valid; None accepts any request.
        self.accept = accept
        self.default_text = default_text
        self.models = models
        self.script: list[Reply] = []
        self.requests: list[ModelRequest] = []
        self.base_url = ""
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self.app = Starlette(
            routes=[Route("/{path:path}", self._dispatch, methods=["GET", "POST"])]
        )

    # -- inspection --------------------------------------------------------------------------

    def responses_requests(self, *, accepted_only: bool = True) -> list[ModelRequest]:
        """The ``/responses`` requests received (by default only those that got a stream)."""
        return [
            r
            for r in self.requests
            if r.path.endswith("/responses") and (not accepted_only or r.status == 200)
        ]

    def rejected(self) -> list[ModelRequest]:
        """Requests refused with 401."""
        return [r for r in self.requests if r.status == 401]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds, re-checked after every request (no timeout here)."""
        while not condition():
            changed = self._changed
            await changed.wait()

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; report ``http://127.0.0.1:PORT`` when bound."""
        async with trio.open_nursery() as nursery:
            self.base_url = await nursery.start(serve_on_loopback, self.app)
            task_status.started(self.base_url)

    def _finish(self, recorded: ModelRequest, response: Response) -> Response:
        recorded.status = response.status_code
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        return response

    async def _dispatch(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        recorded = ModelRequest(
            method=request.method,
            path=request.url.path,
            authorization=request.headers.get("authorization"),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(recorded)
        token = recorded.token
        if self.accept is not None and (token is None or not self.accept(token)):
            return self._finish(
                recorded, _error(401, "invalid or expired token", "invalid_api_key")
            )
        path = recorded.path.rstrip("/")
        if request.method == "GET" and path.endswith("/models"):
            return self._finish(recorded, JSONResponse(self._models_body()))
        if request.method == "POST" and path.endswith("/responses"):
            reply = _normalise(self.script.pop(0)) if self.script else TextReply(self.default_text)
            if isinstance(reply, ErrorReply):
                return self._finish(recorded, _error(reply.status, reply.message, "server_error"))
            stream = StreamingResponse(
                self._stream(reply),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
            return self._finish(recorded, stream)
        return self._finish(recorded, _error(404, f"no route {request.method} {path}", None))

    def _models_body(self) -> dict[str, Any]:
        # OpenAI's list shape; ``models`` is what codex's own model catalogue reads (empty means
        # "nothing to add to the built-in presets").
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models],
            "models": [],
        }

    async def _stream(self, reply: TextReply | FunctionCallReply) -> AsyncIterator[bytes]:
        number = next(self._ids)
        response_id = f"resp_{number}"
        yield _sse({"type": "response.created", "response": {"id": response_id}})
        if isinstance(reply, FunctionCallReply):
            arguments = (
                reply.arguments
                if isinstance(reply.arguments, str)
                else json.dumps(dict(reply.arguments))
            )
            item: dict[str, Any] = {
                "type": "function_call",
                "id": f"fc_{number}",
                "call_id": reply.call_id or f"call_{number}",
                "name": reply.name,
                "arguments": arguments,
                "status": "completed",
            }
            if reply.namespace is not None:
                item["namespace"] = reply.namespace
            yield _sse({"type": "response.output_item.added", "output_index": 0, "item": item})
            yield _sse({"type": "response.output_item.done", "output_index": 0, "item": item})
        else:
            message_id = f"msg_{number}"
            started: dict[str, Any] = {
                "type": "message",
                "id": message_id,
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            yield _sse({"type": "response.output_item.added", "output_index": 0, "item": started})
            yield _sse(
                {
                    "type": "response.output_text.delta",
                    "item_id": message_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": reply.text,
                }
            )
            if reply.hold is not None:
                await reply.hold.wait()
            done = dict(started, status="completed")
            done["content"] = [{"type": "output_text", "text": reply.text, "annotations": []}]
            yield _sse({"type": "response.output_item.done", "output_index": 0, "item": done})
        usage = {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 15,
        }
        yield _sse(
            {
                "type": "response.completed",
                "response": {"id": response_id, "status": "completed", "usage": usage},
            }
        )


def _error(status: int, message: str, code: str | None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": code}},
        status_code=status,
    )
