"""End-to-end tests: the real CLI, several processes, real signals (marked e2e)."""
