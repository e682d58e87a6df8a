"""The hostile workspace user against the operating-system boundary (issue 10), real codex 0.169.0.

The daemon runs as a real ``python -m gateway serve`` process (as root, so children are
isolated), with the HMAC secret in its environment on purpose — the worst case — and the admin
secret and the model key given as files. Two workspaces run at once. Workspace A's client holds
nothing but a valid token for A and speaks JSON-RPC to its child the way a client can:
``fs/readFile``, ``thread/shellCommand`` (``bash -lc``, unsandboxed) and ``command/exec`` with a
``dangerFullAccess`` sandbox. No protocol policy is in front of the child: every refusal below
comes from the operating system. Each attempt is counted (attempts / refused) and printed with
"security counts" at the end of the run.

Every refusal is paired with a positive control through the same route (A reads its own
config.toml and model token), so a route that is simply broken cannot pass for a refusal.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from gateway.auth.tokens import mint_hmac_token
from gateway.sessions.isolation import missing_capabilities
from gateway_tests.daemon_process import (
    client,
    daemon_env,
    one_line,
    run_cli,
    serve_process,
    ws_url,
)
from gateway_tests.fakes.launchers import fake_codex_python
from gateway_tests.harness import (
    ADMIN_SECRET,
    HMAC_SECRET,
    Rpc,
    admin_restart,
    admin_sessions,
    bearer,
    closed_port,
    eventually,
    rejected_connect,
    token_for,
)
from gateway_tests.reliability.support import CountsRecorder
from gateway_tests.security.conftest import SecurityCounts

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the isolated mode needs root (CI runs as root)"
)

STEP = 60.0
MODEL_KEY = "static-model-key-that-only-children-of-its-workspace-may-read"
# What an attacker would love to find anywhere: the gateway's secrets.
SECRETS = (HMAC_SECRET, ADMIN_SECRET)
TOKEN = "run/model-token"


@attrs.define
class Pod:
    """The daemon under attack and what the test knows about it."""

    pid: int
    http_url: str
    tmp_root: Path
    store_dir: Path
    secrets_dir: Path
    uid_range: tuple[int, int]


def write_secret(directory: Path, name: str, value: str) -> Path:
    """A 0400 secret file, as a Kubernetes Secret volume with defaultMode 0400 gives it."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / name
    path.write_text(value + "\n")
    path.chmod(0o400)
    return path


@pytest.fixture
async def pod(tmp_path: Path, real_codex_bin: Path) -> AsyncIterator[Pod]:
    """``python -m gateway serve`` as root with the real codex; secrets both ways."""
    secrets_dir = tmp_path / "secrets"
    env = daemon_env(
        tmp_path,
        real_codex_bin,
        CXG_MODEL_PROVIDER_BASE_URL=f"http://127.0.0.1:{await closed_port()}/v1",
        CXG_ADMIN_SECRET_FILE=str(write_secret(secrets_dir, "admin", ADMIN_SECRET)),
        CXG_CODEX_API_KEY_FILE=str(write_secret(secrets_dir, "model", MODEL_KEY)),
        # Live checkpoints all along: every attack below runs while the gateway reads the
        # attacker's home (with the child's own file ids).
        CXG_CHECKPOINT_INTERVAL="1s",
        # The protocol policy at its widest: what is tried here must be stopped by the
        # operating system alone (the policy is the second layer, tested in test_policy.py).
        CXG_POLICY_FS="any",
        CXG_POLICY_MAX_SANDBOX="danger-full-access",
    )
    del env["CXG_ADMIN_SECRET"]
    first, last = (int(part) for part in env["CXG_CHILD_UID_RANGE"].split("-"))
    async with serve_process(env) as (daemon, http_url):
        await daemon.wait_for_log("isolation.on")
        yield Pod(
            pid=daemon.process.pid,
            http_url=http_url,
            tmp_root=Path(env["CXG_TMP_ROOT"]),
            store_dir=Path(env["CXG_LOCAL_STORE_DIR"]),
            secrets_dir=secrets_dir,
            uid_range=(first, last),
        )
        daemon.process.terminate()
        assert await daemon.wait_exit() == 0
        for secret in (*SECRETS, MODEL_KEY):
            assert secret not in daemon.output


async def session_pid(pod: Pod, workspace_id: str) -> int:
    """The child's pid from the admin listing (the admin secret came from a file)."""
    for entry in await admin_sessions(pod.http_url):
        if entry["workspaceId"] == workspace_id:
            return int(entry["pid"])
    raise AssertionError(f"no session for {workspace_id}")


def ids_of(pid: int) -> dict[str, list[int]]:
    """``Uid``, ``Gid`` and ``Groups`` of a process, from /proc/<pid>/status."""
    found: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            found[key] = [int(part) for part in value.split()]
    return found


class Attacker:
    """Workspace A's client, trying routes and counting what they gave it."""

    def __init__(self, rpc: Rpc, thread_id: str, home: Path, counts: CountsRecorder) -> None:
        self.rpc = rpc
        self.thread_id = thread_id
        self.home = home
        self.counts = counts
        self.loot: list[str] = []
        self._probe = 0

    def _tally(self, route: str, refused: bool) -> None:
        self.counts.add(f"{route}_attempts")
        if refused:
            self.counts.add(f"{route}_refused")

    async def read_file(self, path: str) -> str | None:
        """``fs/readFile``: the content, or None when the child was refused."""
        response = await self.rpc.call("fs/readFile", {"path": path})
        if "result" in response:
            text = base64.b64decode(response["result"]["dataBase64"]).decode("utf-8", "replace")
            self.loot.append(text)
            return text
        self.loot.append(str(response["error"]))
        return None

    async def exec(self, script: str) -> dict[str, Any]:
        """``command/exec`` of ``bash -c`` with a full-access sandbox (what the client asks)."""
        result: dict[str, Any] = await self.rpc.result(
            "command/exec",
            {"command": ["bash", "-c", script], "sandboxPolicy": {"type": "dangerFullAccess"}},
        )
        self.loot.append(result["stdout"] + result["stderr"])
        return result

    async def shell(self, script: str) -> tuple[int, str]:
        """``thread/shellCommand`` (unsandboxed ``bash -lc``); output kept in A's own home."""
        self._probe += 1
        out = self.home / f"probe-{self._probe}.out"
        await self.rpc.result(
            "thread/shellCommand",
            {
                "threadId": self.thread_id,
                "command": f'{{ {script} ; }} > {out} 2>&1; echo "rc=$?" >> {out}',
            },
        )
        # The command runs after the acknowledgement; its output file is the event.
        await eventually(lambda: out.exists() and "rc=" in out.read_text(), within=STEP)
        text = out.read_text()
        self.loot.append(text)
        status = int(re.findall(r"rc=(\d+)", text)[-1])
        return status, text

    async def try_read(self, label: str, path: str) -> None:
        """Read ``path`` through all three routes; each must be refused."""
        content = await self.read_file(path)
        self._tally(f"read_{label}_fs", content is None)
        assert content is None, f"fs/readFile read {path}"
        result = await self.exec(f"head -c 4096 {path} > /dev/null")
        self._tally(f"read_{label}_exec", result["exitCode"] != 0)
        assert result["exitCode"] != 0, f"command/exec read {path}: {result}"
        status, text = await self.shell(f"head -c 4096 {path} > /dev/null")
        self._tally(f"read_{label}_shell", status != 0)
        assert status != 0, f"thread/shellCommand read {path}: {text}"

    async def try_list(self, label: str, path: str) -> None:
        """List ``path`` through command/exec and thread/shellCommand; each must be refused."""
        result = await self.exec(f"ls -a {path}")
        self._tally(f"list_{label}_exec", result["exitCode"] != 0)
        assert result["exitCode"] != 0, f"command/exec listed {path}: {result}"
        status, text = await self.shell(f"ls -a {path}")
        self._tally(f"list_{label}_shell", status != 0)
        assert status != 0, f"thread/shellCommand listed {path}: {text}"

    async def try_write(self, label: str, path: Path) -> None:
        """Create ``path`` through command/exec, thread/shellCommand and fs/writeFile."""
        result = await self.exec(f"echo owned > {path}")
        self._tally(f"write_{label}_exec", result["exitCode"] != 0 and not path.exists())
        status, _ = await self.shell(f"echo owned > {path}")
        self._tally(f"write_{label}_shell", status != 0 and not path.exists())
        response = await self.rpc.call(
            "fs/writeFile",
            {"path": str(path), "dataBase64": base64.b64encode(b"owned").decode()},
        )
        self._tally(f"write_{label}_fs", "error" in response and not path.exists())
        assert not path.exists(), f"the child wrote {path}"


async def test_a_hostile_workspace_reaches_nothing_of_the_gateway_or_of_another_workspace(
    pod: Pod, counts: SecurityCounts
) -> None:
    gateway = f"/proc/{pod.pid}"
    home_a = pod.tmp_root / "ws_a" / "home"
    codex_home_b = pod.tmp_root / "ws_b" / "codex-home"
    with trio.fail_after(STEP * 10):
        async with client(pod.http_url, token_for("ws_b")) as victim:
            thread_b = (await victim.result("thread/start", {}))["thread"]["id"]
            async with client(pod.http_url, token_for("ws_a")) as rpc:
                thread_a = (await rpc.result("thread/start", {}))["thread"]["id"]
                attacker = Attacker(rpc, thread_a, home_a, counts)

                # Who the children are: each its own uid and gid from the range, no groups.
                pid_a, pid_b = await session_pid(pod, "ws_a"), await session_pid(pod, "ws_b")
                ids_a, ids_b = ids_of(pid_a), ids_of(pid_b)
                for ids in (ids_a, ids_b):
                    assert len(set(ids["Uid"])) == 1 and len(set(ids["Gid"])) == 1, ids
                    assert pod.uid_range[0] <= ids["Uid"][0] <= pod.uid_range[1]
                    assert ids["Gid"][0] == ids["Uid"][0]
                    assert ids.get("Groups", []) == []
                assert ids_a["Uid"][0] != ids_b["Uid"][0]
                result = await attacker.exec("id -u; id -g")
                assert result["stdout"].split() == [str(ids_a["Uid"][0])] * 2

                # Positive controls: the routes work on A's own files.
                own_config = await attacker.read_file(
                    str(pod.tmp_root / "ws_a" / "codex-home" / "config.toml")
                )
                assert own_config is not None and "model_provider" in own_config
                own_token = await attacker.read_file(
                    str(pod.tmp_root / "ws_a" / "run" / "model-token")
                )
                assert own_token == MODEL_KEY
                status, text = await attacker.shell("echo mine > ~/mine && cat ~/mine")
                assert status == 0 and "mine" in text

                # The gateway process: environment, memory, open files; argv holds no secret.
                await attacker.try_read("gateway_environ", f"{gateway}/environ")
                await attacker.try_read("gateway_mem", f"{gateway}/mem")
                await attacker.try_list("gateway_fd", f"{gateway}/fd/")
                cmdline = await attacker.read_file(f"{gateway}/cmdline")
                counts.add("read_gateway_cmdline_attempts")
                assert cmdline is not None and "serve" in cmdline  # readable by design …
                assert not any(secret in cmdline for secret in SECRETS)  # … and secret-free
                counts.add("read_gateway_cmdline_refused")

                # Another workspace, running at the same time: its home, config, model token.
                await attacker.try_read("other_config", str(codex_home_b / "config.toml"))
                await attacker.try_read(
                    "other_token", str(pod.tmp_root / "ws_b" / "run" / "model-token")
                )
                # B's child and whatever it runs (env-mcp holds B's cap tokens in its env).
                await attacker.try_read("other_child_environ", f"/proc/{pid_b}/environ")
                await attacker.try_read("other_child_mem", f"/proc/{pid_b}/mem")
                await attacker.try_list("other_home", str(codex_home_b))
                await attacker.try_list("other_root", str(pod.tmp_root / "ws_b"))
                # The session root's parent, the local store, the gateway's secret files.
                await attacker.try_list("tmp_root", str(pod.tmp_root))
                await attacker.try_list("store", str(pod.store_dir))
                await attacker.try_read("admin_secret_file", str(pod.secrets_dir / "admin"))
                await attacker.try_read("model_key_file", str(pod.secrets_dir / "model"))

                # Writing outside its own home: another home, the session roots, the store.
                await attacker.try_write("other_home", codex_home_b / "planted")
                await attacker.try_write("own_root", pod.tmp_root / "ws_a" / "planted")
                await attacker.try_write("tmp_root", pod.tmp_root / "planted")
                await attacker.try_write("store", pod.store_dir / "planted")
                await attacker.try_write("secrets", pod.secrets_dir / "planted")

                # Minting for B with whatever was stolen: no secret was, and guesses fail.
                loot = "\n".join(attacker.loot)
                assert not any(secret in loot for secret in SECRETS)
                candidates = sorted(set(re.findall(r"[A-Za-z0-9_+/=-]{12,}", loot)))[:40]
                for candidate in candidates:
                    counts.add("mint_for_other_attempts")
                    forged = mint_hmac_token(candidate.encode(), "ws_b")
                    rejected = await rejected_connect(ws_url(pod.http_url), bearer(forged))
                    assert rejected.status_code == 401
                    counts.add("mint_for_other_refused")
                assert candidates, "the attacker's loot should at least hold error text"

            # B is untouched and its child still answers.
            assert not (codex_home_b / "planted").exists()
            assert thread_b in str(await victim.result("thread/loaded/list", {}))
    values = counts.values
    attempts = sum(v for k, v in values.items() if k.endswith("_attempts"))
    refused = sum(v for k, v in values.items() if k.endswith("_refused"))
    counts["total_attempts"] = attempts
    counts["total_refused"] = refused
    assert attempts == refused and attempts > 0


async def test_directories_and_files_belong_to_the_sessions_uid_and_no_one_else(
    pod: Pod,
) -> None:
    with trio.fail_after(STEP * 2):
        async with client(pod.http_url, token_for("ws_own")) as rpc:
            await rpc.result("thread/start", {})
            uid = ids_of(await session_pid(pod, "ws_own"))["Uid"][0]
            root = pod.tmp_root / "ws_own"
            assert stat.S_IMODE(pod.tmp_root.stat().st_mode) == 0o711
            assert stat.S_IMODE(pod.store_dir.stat().st_mode) == 0o700
            info = root.stat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, uid, 0o710)
            for name in ("codex-home", "home", "run"):
                info = (root / name).stat()
                assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, uid, 0o700)
            for path in (root / "codex-home" / "config.toml", root / "run" / "model-token"):
                info = path.stat()
                assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, uid, 0o600)
            # A live checkpoint of the running real codex (SQLite in WAL mode) is taken ...
            archive = pod.store_dir / "codex-app-gateway" / "ws_own.tar.gz"
            await eventually(archive.exists, within=STEP)
            with tarfile.open(archive) as tar:
                assert any(name.startswith("state_") for name in tar.getnames())
            # ... and nothing in the child's trees belongs to anyone else (root included).
            for name in ("codex-home", "home", "run"):
                for path in (root / name).rglob("*"):
                    assert path.lstat().st_uid == uid, path


async def test_a_restored_home_is_handed_to_the_new_sessions_uid_and_the_archive_keeps_none(
    pod: Pod,
) -> None:
    with trio.fail_after(STEP * 3):
        async with client(pod.http_url, token_for("ws_cycle")) as rpc:
            await rpc.result("thread/start", {})
            first_uid = ids_of(await session_pid(pod, "ws_cycle"))["Uid"][0]
            written = await rpc.result(
                "command/exec",
                {
                    # A file of its own, and links to what it must never get back: the
                    # gateway's secret file and another session root (skipped, never followed).
                    "command": [
                        "bash",
                        "-c",
                        "echo kept > $CODEX_HOME/kept.txt"
                        f" && ln -s {pod.secrets_dir / 'admin'} $CODEX_HOME/stolen-secret"
                        f" && ln -s {pod.tmp_root} $CODEX_HOME/stolen-root",
                    ],
                    "sandboxPolicy": {"type": "dangerFullAccess"},
                },
            )
            assert written["exitCode"] == 0, written
        response = await admin_restart(pod.http_url, "ws_cycle")
        assert response.status_code == 204
        archive = pod.store_dir / "codex-app-gateway" / "ws_cycle.tar.gz"
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
        assert any(member.name == "kept.txt" for member in members)
        assert not [member.name for member in members if member.name.startswith("stolen")]
        assert {(member.uid, member.gid) for member in members} == {(0, 0)}
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                extracted = tar.extractfile(member) if member.isfile() else None
                if extracted is not None:
                    assert ADMIN_SECRET.encode() not in extracted.read()
        async with client(pod.http_url, token_for("ws_cycle")) as rpc:
            second_uid = ids_of(await session_pid(pod, "ws_cycle"))["Uid"][0]
            assert second_uid != first_uid  # round-robin: the released uid is the last reused
            kept = pod.tmp_root / "ws_cycle" / "codex-home" / "kept.txt"
            assert kept.read_text() == "kept\n"
            assert kept.stat().st_uid == second_uid
            result = await rpc.result(
                "command/exec", {"command": ["bash", "-c", "cat $CODEX_HOME/kept.txt"]}
            )
            assert result["stdout"] == "kept\n"


async def test_a_session_end_kills_what_its_uid_left_running(pod: Pod) -> None:
    with trio.fail_after(STEP * 2):
        async with client(pod.http_url, token_for("ws_escape")) as rpc:
            await rpc.result("thread/start", {})
            uid = ids_of(await session_pid(pod, "ws_escape"))["Uid"][0]
            # A daemon that leaves the child's process group and session.
            result = await rpc.result(
                "command/exec",
                {
                    "command": [
                        "bash",
                        "-c",
                        "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo $!",
                    ],
                    "sandboxPolicy": {"type": "dangerFullAccess"},
                },
            )
            escaped = int(result["stdout"].split()[0])
            assert ids_of(escaped)["Uid"][0] == uid
        response = await admin_restart(pod.http_url, "ws_escape")
        assert response.status_code == 204

        def gone() -> bool:
            try:
                status = Path(f"/proc/{escaped}/status").read_text()
            except FileNotFoundError:
                return True
            # Killed but not yet reaped by its new parent (init) counts as gone.
            return "State:\tZ" in status or f"Uid:\t{uid}\t" not in status

        await eventually(gone, within=STEP)


async def test_a_secret_file_readable_by_others_or_a_secret_set_twice_stops_the_start(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    loose = tmp_path / "loose"
    loose.write_text("loose-secret-value")
    loose.chmod(0o644)
    env = daemon_env(
        tmp_path, fake_codex_bin, CXG_ADMIN_SECRET="", CXG_ADMIN_SECRET_FILE=str(loose)
    )
    result = await run_cli(["serve"], env)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "CXG_ADMIN_SECRET_FILE" in line and "0644" in line
    assert "loose-secret-value" not in line
    tight = write_secret(tmp_path / "s", "admin", "value")
    env = daemon_env(tmp_path, fake_codex_bin, CXG_ADMIN_SECRET_FILE=str(tight))
    result = await run_cli(["serve"], env)
    assert result.returncode == 2
    assert "both CXG_ADMIN_SECRET and CXG_ADMIN_SECRET_FILE are set" in one_line(result.stderr)


async def test_the_charts_capabilities_are_enough_and_fewer_are_refused(
    tmp_path: Path, fake_codex_bin: Path
) -> None:
    """Exactly CHOWN, DAC_OVERRIDE, KILL, SETGID, SETUID (the chart's list): a session starts,
    saves and restores; without DAC_OVERRIDE ``required`` refuses to start, naming it."""
    chart = "-all,+chown,+dac_override,+kill,+setgid,+setuid"
    assert missing_capabilities(sum(1 << bit for bit in (0, 1, 5, 6, 7))) == []
    env = daemon_env(tmp_path, fake_codex_bin, CXG_CHILD_ISOLATION="required")
    async with serve_process(env, prefix=["setpriv", f"--bounding-set={chart}", "--"]) as (
        daemon,
        http_url,
    ):
        await daemon.wait_for_log("isolation.on")
        with trio.fail_after(STEP):
            async with client(http_url, token_for("ws_caps")) as rpc:
                thread_id = (await rpc.result("thread/start", {}))["thread"]["id"]
            response = await admin_restart(http_url, "ws_caps")
            assert response.status_code == 204
            async with client(http_url, token_for("ws_caps")) as rpc:
                listed = await rpc.result("thread/list", {})
                assert thread_id in {thread["id"] for thread in listed["data"]}
        daemon.process.terminate()
        assert await daemon.wait_exit() == 0
    fewer = "-all,+chown,+kill,+setgid,+setuid"
    result = await run_cli(["serve"], env, prefix=["setpriv", f"--bounding-set={fewer}", "--"])
    assert result.returncode == 2
    # The start-up log lines come first; the refusal is the last line, and one line.
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("codex-app-gateway serve: CXG_CHILD_ISOLATION=required")
    assert "DAC_OVERRIDE" in last and "CHOWN" not in last


@pytest.mark.parametrize("hardened", [True, False])
async def test_non_dumpable_closes_environ_and_mem_even_to_the_same_uid(
    tmp_path: Path, hardened: bool
) -> None:
    """What protects the secrets when children cannot be isolated (same uid as the gateway).

    A process of an unprivileged uid holds a secret in its environment; another process of the
    same uid tries to read its /proc files. After ``harden_process`` (what the daemon calls at
    start) it is refused; without it — the control — it is not.
    """
    uid = 4_000_000 + os.getpid() % 1000
    holder_script = (
        "import sys, time\n"
        "from gateway.sessions.isolation import harden_process\n"
        f"{'harden_process()' if hardened else 'pass'}\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    secret = "same-uid-secret-value"
    options: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []}
    holder = await trio.lowlevel.open_process(
        [str(fake_codex_python()), "-c", holder_script],
        env={"HOLDER_SECRET": secret, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd="/",
        stdout=subprocess.PIPE,
        **options,
    )
    try:
        assert holder.stdout is not None
        seen = b""
        with trio.fail_after(STEP):
            while b"ready\n" not in seen:
                chunk = await holder.stdout.receive_some(4096)
                assert chunk, seen
                seen += chunk
        for name in ("environ", "mem"):
            reader = await trio.run_process(
                ["head", "-c", "4096", f"/proc/{holder.pid}/{name}"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd="/",
                **options,
            )
            if hardened:
                assert reader.returncode != 0 and b"Permission denied" in reader.stderr, name
            elif name == "environ":
                assert secret.encode() in reader.stdout
    finally:
        holder.kill()
        with trio.CancelScope(shield=True):
            await holder.wait()
