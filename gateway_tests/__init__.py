"""The gateway's tests.

Test modules (``test_*.py``) import helpers and fixtures only from the shared modules, never
from one another: ``conftest.py`` (fixtures for every module: gateways, S3, fakes),
``harness.py`` (the in-process daemon, its client, rejected connects, admin calls),
``daemon_process.py`` (``python -m gateway`` as a process), ``real_codex_turns.py``,
``tui.py``, ``app_server_process.py``, ``executor_fixtures.py``, ``hostile_archives.py``,
``process_trees.py``, ``daemon_credentials.py``, ``helm_render.py``, ``config_samples.py``,
``s3_server.py``/``s3_control.py`` and the fakes in ``fakes/``.
"""
