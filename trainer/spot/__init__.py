"""Spot instances: `stop` (SIGTERM/SIGINT and the agreed stop across ranks), `notices` (cloud metadata
preemption notices) and `supervisor` (the pod's entrypoint; it never imports the training loop)."""
