"""Self-tests of the fakes that stand in for agentserver and the model server."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import trio

from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.fakes.fake_model_server import (
    ErrorReply,
    FakeModelServer,
    function_call_outputs,
    output_text,
)

SECRET = "internal-secret-for-tests"


async def test_fake_agentserver_verify() -> None:
    fake = FakeAgentserver(internal_secret=SECRET)
    fake.add_verify_token("ast_good", user_id="u1", workspace_id="ws1")
    async with trio.open_nursery() as nursery, httpx2.AsyncClient() as http:
        base = await nursery.start(fake.serve)
        url = f"{base}/api/internal/codex/tokens/verify"
        headers = {"X-Internal-Secret": SECRET}

        ok = await http.post(url, json={"token": "ast_good"}, headers=headers)
        assert ok.status_code == 200
        assert ok.json() == {"user_id": "u1", "workspace_id": "ws1"}

        bad = await http.post(url, json={"token": "ast_bad"}, headers=headers)
        assert (bad.status_code, bad.json()) == (401, {"error": "invalid_token"})

        no_secret = await http.post(url, json={"token": "ast_good"})
        assert no_secret.status_code == 401

        fake.remove_verify_token("ast_good")
        revoked = await http.post(url, json={"token": "ast_good"}, headers=headers)
        assert revoked.status_code == 401

        fake.outage = True
        down = await http.post(url, json={"token": "ast_good"}, headers=headers)
        assert down.status_code == 503
        assert fake.request_count("/api/internal/codex/tokens/verify") == 5
        nursery.cancel_scope.cancel()


async def test_fake_agentserver_modelserver_tokens() -> None:
    fake = FakeAgentserver(internal_secret=SECRET)
    fake.connect_modelserver("ws1", ttl=60.0)
    async with trio.open_nursery() as nursery, httpx2.AsyncClient() as http:
        base = await nursery.start(fake.serve)
        headers = {"X-Internal-Secret": SECRET}

        first = await http.get(f"{base}/internal/workspaces/ws1/modelserver-token", headers=headers)
        assert first.status_code == 200
        body = first.json()
        assert body["access_token"] == fake.current_token("ws1")
        assert body["expires_at"].endswith("Z") and "T" in body["expires_at"]
        assert fake.token_valid("ws1", body["access_token"])

        # No rotation configured: the same token again; a forced rotation invalidates it.
        again = await http.get(f"{base}/internal/workspaces/ws1/modelserver-token", headers=headers)
        assert again.json()["access_token"] == body["access_token"]
        newer = fake.rotate("ws1")
        assert newer != body["access_token"]
        assert not fake.token_valid("ws1", body["access_token"])
        assert fake.token_valid("ws1", body["access_token"], latest_only=False)

        missing = await http.get(
            f"{base}/internal/workspaces/ws%2F2/modelserver-token", headers=headers
        )
        assert missing.status_code == 404
        assert (
            fake.token_requests("ws/2")[0].path == "/internal/workspaces/ws%2F2/modelserver-token"
        )

        unauthenticated = await http.get(f"{base}/internal/workspaces/ws1/modelserver-token")
        assert unauthenticated.status_code == 401

        fake.connect_modelserver("ws3", empty=True)
        empty = await http.get(f"{base}/internal/workspaces/ws3/modelserver-token", headers=headers)
        assert empty.status_code == 200 and empty.json()["access_token"] == ""
        nursery.cancel_scope.cancel()


async def test_fake_agentserver_rotates_lazily() -> None:
    fake = FakeAgentserver(internal_secret=SECRET)
    fake.connect_modelserver("ws1", rotate_every=0.2, ttl=None)
    async with trio.open_nursery() as nursery, httpx2.AsyncClient() as http:
        base = await nursery.start(fake.serve)
        url = f"{base}/internal/workspaces/ws1/modelserver-token"
        headers = {"X-Internal-Secret": SECRET}
        seen: list[str] = []
        with trio.fail_after(10):
            while len(set(seen)) < 3:
                asked_at = trio.current_time()
                response = await http.get(url, headers=headers)
                assert "expires_at" not in response.json()
                seen.append(response.json()["access_token"])
                # The next rotation is due 0.2 s after this fetch: ask again exactly then.
                await trio.sleep_until(asked_at + 0.2)
        assert seen[-1] == fake.current_token("ws1")
        assert fake.issued_tokens("ws1") == sorted(set(seen))

        async def poll_once() -> None:
            await http.get(url, headers=headers)

        before = len(fake.token_requests("ws1"))
        nursery.start_soon(poll_once)
        with trio.fail_after(5):
            await fake.wait_until(lambda: len(fake.token_requests("ws1")) > before)
        assert fake.token_requests("ws1")[-1].status == 200
        nursery.cancel_scope.cancel()


def _events(stream_text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a server-sent-events body, checking each ``event:`` name."""
    events = []
    for block in stream_text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {payload['type']}"
        events.append(payload)
    return events


async def test_fake_model_server_streams_and_checks_tokens() -> None:
    valid = {"tok-1"}
    model = FakeModelServer(accept=lambda token: token in valid, default_text="hi there")
    model.script.append(
        {
            "function_call": {
                "namespace": "mcp__exe_a",
                "name": "shell",
                "arguments": {"command": "echo hi"},
            }
        }
    )
    model.script.append(ErrorReply(500))
    async with trio.open_nursery() as nursery, httpx2.AsyncClient() as http:
        base = await nursery.start(model.serve)
        good = {"Authorization": "Bearer tok-1"}

        models = await http.get(f"{base}/v1/models", headers=good)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "gpt-5.5"

        refused = await http.post(f"{base}/v1/responses", json={"input": []})
        assert refused.status_code == 401
        wrong = await http.post(
            f"{base}/v1/responses", json={"input": []}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        assert [r.token for r in model.rejected()] == [None, "nope"]
        assert model.script, "a refused request must not consume a scripted reply"

        call = await http.post(f"{base}/v1/responses", json={"input": []}, headers=good)
        assert call.headers["content-type"].startswith("text/event-stream")
        events = _events(call.text)
        assert [e["type"] for e in events] == [
            "response.created",
            "response.output_item.added",
            "response.output_item.done",
            "response.completed",
        ]
        item = events[2]["item"]
        assert (item["type"], item["namespace"], item["name"]) == (
            "function_call",
            "mcp__exe_a",
            "shell",
        )
        assert json.loads(item["arguments"]) == {"command": "echo hi"}

        failed = await http.post(f"{base}/responses", json={}, headers=good)
        assert failed.status_code == 500

        follow_up = {
            "input": [
                {
                    "type": "function_call_output",
                    "call_id": item["call_id"],
                    "output": [{"type": "input_text", "text": "hi\n"}],
                }
            ]
        }
        text = await http.post(f"{base}/v1/responses", json=follow_up, headers=good)
        events = _events(text.text)
        assert [e["type"] for e in events] == [
            "response.created",
            "response.output_item.added",
            "response.output_text.delta",
            "response.output_item.done",
            "response.completed",
        ]
        assert events[2]["delta"] == "hi there"
        assert events[3]["item"]["content"][0] == {
            "type": "output_text",
            "text": "hi there",
            "annotations": [],
        }
        assert events[4]["response"]["usage"]["total_tokens"] == 15

        last = model.responses_requests()[-1]
        outputs = function_call_outputs(last.body)
        assert outputs[0]["call_id"] == item["call_id"] and output_text(outputs[0]) == "hi\n"
        assert last.authorization == "Bearer tok-1"
        assert len(model.responses_requests(accepted_only=False)) == 5
        nursery.cancel_scope.cancel()
