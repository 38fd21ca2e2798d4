"""make bench: the service measured against the ceiling of its own stack (python -m bench.run)."""
