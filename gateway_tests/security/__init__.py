"""Security tests: the hostile user of a workspace, tried against the real codex."""
