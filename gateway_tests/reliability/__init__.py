"""The reliability suite: load, faults and bad input, with counts (``docs/reliability.md``)."""
