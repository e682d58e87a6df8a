"""Replica mode: several gateway pods share one store, and each workspace has one owner.

``placement``: the seam the session manager and the front door use (who owns a workspace,
claiming it, forwarding to its owner). The single-pod daemon uses ``SolePlacement``.
"""
