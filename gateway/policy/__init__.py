"""What a client may ask of its session's codex: a pure check of each client→child message."""

from gateway.policy.client_policy import ClientPolicy, Refusal

__all__ = ["ClientPolicy", "Refusal"]
