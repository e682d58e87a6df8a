"""With the REAL codex 0.169.0: what a client starts in the background ends with the session.

``thread/shellCommand`` runs ``bash -lc`` under ``setsid`` (outside the child's process group)
and a backgrounded ``sleep`` outlives that shell: it is exactly the process a stop that only
signals the child, or its group, leaves running.
"""

from __future__ import annotations

import re

import trio

from gateway.sessions.process_tree import read_stat
from gateway_tests.harness import RunningGateway, connect, eventually
from gateway_tests.process_trees import is_running
from gateway_tests.real_codex_turns import STEP_TIMEOUT


async def test_a_background_process_of_a_shell_command_ends_with_the_session(
    real_gateway: RunningGateway,
) -> None:
    with trio.fail_after(STEP_TIMEOUT * 2):
        async with connect(real_gateway, "ws_real_bg") as rpc:
            entry = await real_gateway.session("ws_real_bg")
            assert entry is not None
            child = entry["pid"]
            thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            await rpc.result(
                "thread/shellCommand",
                {"threadId": thread_id, "command": "sleep 1000 >/dev/null 2>&1 & echo bg=$!"},
            )
            done = await rpc.wait_for(
                "item/completed",
                lambda m: "bg=" in str(m["params"]["item"].get("aggregatedOutput") or ""),
            )
            output = str(done["params"]["item"]["aggregatedOutput"])
            match = re.search(r"bg=(\d+)", output)
            assert match is not None, output
            pid = int(match.group(1))
            stat = read_stat(pid)
            assert stat is not None and stat.alive
            # The shell exited: the sleep was adopted by the child (a subreaper), and it is in
            # a session of its own, not the child's.
            await eventually(lambda: getattr(read_stat(pid), "ppid", None) == child)
            assert stat.sid != child
            start_time = stat.start_time

            response = await real_gateway.restart("ws_real_bg")
            assert response.status_code == 204
        assert not is_running(pid, start_time)
