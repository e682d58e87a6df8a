"""Complete settings groups for tests that configure one feature by its variables.

Each group is every variable its feature needs, with values no deployment would use.
"""

from __future__ import annotations

# The exec gateway: executors for the sessions (every one of these or none).
EXEC_GATEWAY = {
    "CXG_EXEC_GATEWAY_URL": "ws://exec-gw:6060/",
    "CXG_EXEC_GATEWAY_INTERNAL_URL": "http://exec-gw:6060",
    "CXG_EXEC_GATEWAY_INTERNAL_SECRET": "exec-gateway-internal-secret",
    "CXG_CAPTOKEN_HMAC_SECRET": "captoken-hmac-secret",
}
