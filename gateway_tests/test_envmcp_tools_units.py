"""The executor tools' pure parts: argument bounds, paths, output bounds, listings, patches."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.envmcp.bridge import EnvironmentInfo
from gateway.envmcp.registry import ToolRegistry
from gateway.envmcp.server import listed_tool
from gateway.envmcp.specs import EXECUTOR_TOOLS
from gateway.envmcp.tools import exec as exec_tool
from gateway.envmcp.tools import files, sessions
from gateway.envmcp.tools.files import MAX_ANSWER_CHARS, decode_text, render_lines
from gateway.envmcp.tools.output import HeadTail
from gateway.envmcp.tools.patch_format import (
    AddFile,
    DeleteFile,
    Hunk,
    PatchError,
    UpdateFile,
    apply_hunks,
    find_lines,
    parse_patch,
)
from gateway.envmcp.tools.paths import resolve_path

INFO = EnvironmentInfo(cwd_uri="file:///home/daisy/work", home_uri="file:///home/daisy")


# -- the specs ----------------------------------------------------------------------------------


TOOLS = ToolRegistry(EXECUTOR_TOOLS)


def test_every_spec_lists_a_strict_schema_and_names_the_executor() -> None:
    for spec in EXECUTOR_TOOLS[1:]:  # shell, the first, predates them and is not strict
        tool = listed_tool(spec, "Daisy's MacBook")
        assert "Daisy's MacBook" in (tool.description or "")
        schema = tool.input_schema
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) <= set(schema["properties"])
        multiplexed = listed_tool(spec, None).input_schema
        assert multiplexed["required"][0] == "environment_id"
        assert set(multiplexed["required"]) <= set(multiplexed["properties"])


# -- arguments ----------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("shell_command", {}, "command is required"),
    ("shell_command", {"command": ""}, "must not be empty"),
    ("shell_command", {"command": ["ls"]}, "command must be a string"),
    ("shell_command", {"command": "ls", "timeout_ms": 0}, "between 1 and"),
    ("shell_command", {"command": "ls", "timeout_ms": 1.5}, "must be an integer"),
    ("shell_command", {"command": "ls", "timeout_ms": True}, "must be an integer"),
    ("shell_command", {"command": "ls", "max_output_bytes": 10**9}, "between"),
    ("shell_command", {"command": "ls", "cwd": "/"}, "unknown argument 'cwd'"),
    ("shell_command", {"command": "a\x00b"}, "NUL"),
    ("shell_command", {"command": "ls", "workdir": "a\x00b"}, "NUL"),
    ("shell_command", {"command": "x" * (256 * 1024 + 1)}, "at most"),
    ("shell_command", {"command": "\ud800"}, "lone surrogate"),
    ("shell_command", {"command": "ls", "login": "yes"}, "true or false"),
    ("exec_command", {"cmd": "cat", "yield_time_ms": 30_001}, "between 0 and 30000"),
    ("exec_command", {"cmd": "cat", "tty": 1}, "true or false"),
    ("write_stdin", {"chars": "x"}, "session_id is required"),
    ("write_stdin", {"session_id": "1"}, "must be an integer"),
    ("write_stdin", {"session_id": 0}, "between 1 and"),
    ("write_stdin", {"session_id": 1, "chars": 5}, "chars must be a string"),
    ("write_stdin", {"session_id": 1, "chars": "x" * (64 * 1024 + 1)}, "at most"),
    ("terminate_session", {"session_id": 1, "force": True}, "unknown argument 'force'"),
    ("read_file", {}, "path is required"),
    ("read_file", {"path": ""}, "must not be empty"),
    ("read_file", {"path": "   "}, "must not be empty"),
    ("read_file", {"path": "a\x00b"}, "NUL"),
    ("read_file", {"path": "a\nb"}, "line breaks"),
    ("read_file", {"path": "a/" * 2049}, "at most 4096"),
    ("read_file", {"path": "f", "offset": 0}, "between 1 and"),
    ("read_file", {"path": "f", "limit": 10_001}, "between 1 and 10000"),
    ("write_file", {"path": "f"}, "content is required"),
    ("write_file", {"path": "f", "content": "x" * (1024 * 1024 + 1)}, "at most 1048576"),
    ("apply_patch", {}, "input is required"),
    ("apply_patch", {"input": "x" * (1024 * 1024 + 1)}, "at most"),
    ("apply_patch", {"input": "hello"}, "first line of the patch"),
    (
        "apply_patch",
        {"input": "*** Begin Patch\n*** Add File: a\x00b\n+x\n*** End Patch"},
        "NUL",
    ),
]


@pytest.mark.parametrize(("tool", "arguments", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_with_what_to_fix(
    tool: str, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        spec = TOOLS.get(tool)
        assert spec is not None and spec.validate is not None
        spec.validate(arguments)


def test_good_arguments_get_defaults() -> None:
    shell = exec_tool.parse_arguments({"command": "ls", "timeout_ms": 5.0})
    assert (shell.timeout_ms, shell.login, shell.max_output_bytes) == (5, False, 64 * 1024)
    start = sessions.parse_start({"cmd": "cat"})
    assert (start.tty, start.yield_ms, start.workdir) == (False, 2000, None)
    write = sessions.parse_write({"session_id": 3})
    assert (write.session_id, write.chars, write.yield_ms) == (3, "", 1000)
    read = files.parse_read({"path": "a.txt"})
    assert (read.offset, read.limit) == (1, 2000)


# -- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        ("notes.txt", "/home/daisy/work/notes.txt"),
        ("../x", "/home/daisy/x"),
        ("../../../../etc/hosts", "/etc/hosts"),
        ("/srv/a b", "/srv/a b"),
        ("~/.bashrc", "/home/daisy/.bashrc"),
        ("file:///srv/x%20y", "/srv/x y"),
        ("./a//b/", "/home/daisy/work/a/b"),
    ],
)
def test_paths_resolve_as_the_shell_tools_cwd(path: str, resolved: str) -> None:
    result = resolve_path(path, INFO)
    assert result.path == resolved
    assert result.uri.startswith("file:///")
    assert resolve_path(result.uri, INFO).path == resolved


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("file://evil.example/etc/passwd", "without a host"),
        ("file:relative", "without a host"),
        ("file:///a%00b", "NUL"),
        ("file:///a%0Ab", "line breaks"),
        ("", "must not be empty"),
    ],
)
def test_hostile_paths_are_refused(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_path(path, INFO)


def test_parent_of_a_path() -> None:
    assert resolve_path("/a/b/c.txt", INFO).parent.path == "/a/b"
    assert resolve_path("/c.txt", INFO).parent.path == "/"


# -- output bounds ------------------------------------------------------------------------------


def test_head_and_tail_are_kept_and_the_middle_counted() -> None:
    out = HeadTail(limit=10)
    for n in range(100):
        out.add(f"{n:02d}".encode())
    assert out.total == 200
    assert out.dropped == 190
    assert out.text() == "00010\n[… 190 bytes of output left out …]\n79899"
    small = HeadTail(limit=100)
    small.add("é".encode()[:1])
    small.add("é".encode()[1:])
    assert small.text() == "é"


# -- read_file's listing ------------------------------------------------------------------------


def test_listing_numbers_lines_and_says_where_to_read_on() -> None:
    text = "".join(f"line {n}\n" for n in range(1, 11))
    listing, failed = render_lines("/f", text, 3, 2, truncated=False)
    assert not failed
    assert listing == "L3: line 3\nL4: line 4\n[6 more lines; read on with offset 5]"
    whole, _ = render_lines("/f", text, 1, 2000, truncated=False)
    assert whole.splitlines()[-1] == "L10: line 10"
    past, failed = render_lines("/f", text, 11, 5, truncated=False)
    assert failed and "past the end of /f (10 lines)" in past
    assert render_lines("/f", "", 1, 5, truncated=False) == ("[/f is empty]", False)


def test_listing_bounds_long_lines_and_the_answer() -> None:
    listing, _ = render_lines("/f", "x" * 5000 + "\n", 1, 10, truncated=False)
    assert listing == "L1: " + "x" * 2000 + " […3000 more characters]"
    many = "y" * 1999 + "\n"
    listing, _ = render_lines("/f", many * 1000, 1, 1000, truncated=False)
    assert len(listing) <= MAX_ANSWER_CHARS + 100
    assert "more lines; read on with offset" in listing


def test_a_truncated_file_says_so() -> None:
    listing, _ = render_lines("/f", "a\nb\n", 1, 10, truncated=True)
    assert "longer than 4 MiB" in listing
    beyond, failed = render_lines("/f", "a\nb\n", 50, 10, truncated=True)
    assert failed and "beyond the first 4 MiB" in beyond


def test_binary_detection() -> None:
    assert decode_text(b"plain\n", truncated=False) == "plain\n"
    assert decode_text(b"a\x00b", truncated=False) is None
    assert decode_text(b"\xff\xfe", truncated=False) is None
    assert decode_text("ab€".encode()[:-1], truncated=True) == "ab"  # cut by the bound
    assert decode_text("ab€".encode()[:-1], truncated=False) is None


# -- the patch format ---------------------------------------------------------------------------

END = "*** End Patch"

FULL_PATCH = """*** Begin Patch
*** Add File: hello.txt
+Hello world
+
*** Update File: src/app.py
*** Move to: src/main.py
@@ def greet():
-    print("Hi")
+    print("Hello, world!")
*** Delete File: obsolete.txt
*** End Patch
"""


def test_a_patch_parses_into_its_operations() -> None:
    operations = parse_patch(FULL_PATCH)
    assert operations == (
        AddFile("hello.txt", "Hello world\n\n"),
        UpdateFile(
            "src/app.py",
            "src/main.py",
            (Hunk("def greet():", ('    print("Hi")',), ('    print("Hello, world!")',)),),
        ),
        DeleteFile("obsolete.txt"),
    )


def test_crlf_patches_and_a_first_hunk_without_its_marker_parse() -> None:
    patch = "*** Begin Patch\r\n*** Update File: a\r\n-x\r\n+y\r\n*** End Patch\r\n"
    assert parse_patch(patch) == (UpdateFile("a", None, (Hunk(None, ("x",), ("y",)),)),)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("*** Begin Patch\n*** End Patch", "changes no file"),
        ("*** Begin Patch\n*** Add File: a\n+x", "last line of the patch"),
        ("*** Begin Patch\nrm -rf /\n*** End Patch", "line 2: expected"),
        ("*** Begin Patch\n*** Add File: \n*** End Patch", "needs a path"),
        ("*** Begin Patch\n*** Update File: a\n*** End Patch", "has no changes"),
        ("*** Begin Patch\n*** Update File: a\n@@\n*** End Patch", "empty hunk"),
        ("*** Begin Patch\n*** Update File: a\n@@\n?x\n*** End Patch", "must start with"),
        (
            "*** Begin Patch\n*** Delete File: a\n*** Delete File: a\n*** End Patch",
            "more than once",
        ),
        (
            "*** Begin Patch\n" + "".join(f"*** Delete File: f{n}\n" for n in range(101)) + END,
            "more than 100",
        ),
    ],
)
def test_malformed_patches_say_where(patch: str, message: str) -> None:
    with pytest.raises(PatchError, match=message):
        parse_patch(patch)


def _update(body: str) -> UpdateFile:
    (op,) = parse_patch(f"*** Begin Patch\n*** Update File: f\n{body}\n{END}")
    assert isinstance(op, UpdateFile)
    return op


def test_hunks_replace_lines_found_after_their_anchor() -> None:
    original = "def a():\n    return 1\n\ndef b():\n    return 1\n"
    op = _update("@@ def b():\n-    return 1\n+    return 2")
    expected = "def a():\n    return 1\n\ndef b():\n    return 2\n"
    assert apply_hunks(original, op.hunks, "f") == expected


def test_several_hunks_apply_in_order() -> None:
    original = "".join(f"{n}\n" for n in range(1, 11))
    op = _update("@@\n 2\n-3\n+three\n 4\n@@\n 8\n-9\n+nine\n 10")
    assert apply_hunks(original, op.hunks, "f") == original.replace("3\n", "three\n").replace(
        "9\n", "nine\n"
    )


def test_whitespace_and_typography_are_forgiven_in_that_order() -> None:
    assert find_lines(["a  ", "b"], ["a", "b"], 0) == 0
    assert find_lines(["  a", "b"], ["a", "b"], 0) == 0
    assert find_lines(["x = \u201cq\u201d \u2014 1"], ['x = "q" - 1'], 0) == 0
    assert find_lines(["a", "a"], ["a"], 1) == 1
    assert find_lines(["a", "b", "a"], ["a"], 0, at_end=True) == 2
    assert find_lines(["a"], ["a", "b"], 0) is None


def test_pure_additions_go_after_the_anchor_or_at_the_end() -> None:
    original = "import os\n\ndef main():\n    pass\n"
    after_anchor = _update("@@ import os\n+import sys")
    assert apply_hunks(original, after_anchor.hunks, "f").startswith("import os\nimport sys\n\n")
    at_end = _update("@@\n+# end")
    assert apply_hunks(original, at_end.hunks, "f").endswith("    pass\n# end\n")


def test_end_of_file_hunks_and_missing_final_newlines() -> None:
    op = _update("@@\n x\n-y\n+z\n*** End of File")
    assert apply_hunks("x\ny\nx\ny", op.hunks, "f") == "x\ny\nx\nz\n"


def test_crlf_files_keep_their_line_ends() -> None:
    op = _update("@@\n-b\n+B")
    assert apply_hunks("a\r\nb\r\nc\r\n", op.hunks, "f") == "a\r\nB\r\nc\r\n"


def test_a_hunk_that_does_not_match_names_the_file_and_the_lines() -> None:
    op = _update("@@\n-not there\n+x")
    with pytest.raises(PatchError, match="f: hunk 1: these lines were not found"):
        apply_hunks("a\nb\n", op.hunks, "f")
    anchored = _update("@@ class Missing\n-a\n+b")
    with pytest.raises(PatchError, match="'class Missing' was not found"):
        apply_hunks("a\n", anchored.hunks, "f")


# -- process/read answers -----------------------------------------------------------------------


async def test_reads_follow_the_sequence_and_notice_what_the_executor_dropped() -> None:
    import base64

    from gateway.envmcp.tools.process_io import ProcessState, _apply

    def chunk(seq: int, data: bytes) -> dict[str, Any]:
        return {"seq": seq, "stream": "stdout", "chunk": base64.b64encode(data).decode()}

    state, out = ProcessState("p"), HeadTail(1000)
    _apply(state, {"chunks": [chunk(1, b"a"), chunk(2, b"b")], "nextSeq": 3}, out)
    assert (state.after_seq, state.lost_output, state.idle) == (2, False, False)
    # Chunks 3..9 were no longer kept; closed comes while output is still buffered.
    _apply(state, {"chunks": [chunk(10, b"z")], "nextSeq": 11, "exited": True, "closed": True}, out)
    assert (state.after_seq, state.lost_output, state.exit_code) == (10, True, None)
    assert not state.finished  # a read after "closed" must still come back empty
    _apply(state, {"chunks": [], "nextSeq": 11, "exited": True, "exitCode": 0, "closed": True}, out)
    assert state.finished and state.exit_code == 0
    assert out.text() == "abz"


async def test_the_exit_taking_a_sequence_number_is_no_lost_output() -> None:
    import base64

    from gateway.envmcp.tools.process_io import ProcessState, _apply

    def chunk(seq: int) -> dict[str, Any]:
        return {"seq": seq, "stream": "stdout", "chunk": base64.b64encode(b"x").decode()}

    state, out = ProcessState("p"), HeadTail(1000)
    _apply(state, {"chunks": [chunk(1), chunk(2)], "nextSeq": 3}, out)
    # seq 3 is the exit; output drained from the pipes after it comes as 4 and 5.
    _apply(state, {"chunks": [chunk(4), chunk(5)], "nextSeq": 6, "exited": True}, out)
    assert not state.lost_output
    assert out.text() == "xxxx"


def test_scripts_run_with_the_executors_shell() -> None:
    from gateway.envmcp.tools.process_io import script_argv

    bash = EnvironmentInfo(shell_path="/bin/zsh")
    assert script_argv(bash, "ls", login=False) == ["/bin/zsh", "-c", "ls"]
    assert script_argv(bash, "ls", login=True) == ["/bin/zsh", "-lc", "ls"]
    assert script_argv(EnvironmentInfo(), "ls", login=False) == ["/bin/sh", "-c", "ls"]
    info = EnvironmentInfo.from_initialize({"environmentInfo": {"shell": {"path": "/bin/bash"}}})
    assert info.shell_path == "/bin/bash"
