"""The executor tools beyond ``shell``: what codex's own local tools offer, run on the executor.

Their specs (names, descriptions, schemas) are in ``gateway/envmcp/specs.py``; the code of each
lives here, one module per tool family, imported at the tool's first call:

* ``exec`` — ``shell_command``: a script run to its end with the executor's shell;
* ``sessions`` — ``exec_command``, ``write_stdin``, ``terminate_session``: interactive
  processes on the executors' kept connections, in a table that lives as long as env-mcp;
* ``files`` — ``read_file`` and ``write_file``;
* ``patch`` (with ``patch_format``) — ``apply_patch``;
* ``arguments``, ``paths``, ``fs``, ``process_io``, ``output`` — argument checks, executor paths,
  the ``fs/*`` methods, reading a process, bounded output.

A handler takes the call's :class:`~gateway.envmcp.registry.ToolCall` and the raw arguments,
parses them (a ``ValueError`` says what to fix) and answers with a
:class:`~gateway.envmcp.registry.TextOutcome`: every failure on the executor is an error outcome
with one clear sentence.
"""
