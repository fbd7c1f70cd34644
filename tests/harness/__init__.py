"""Helpers shared by tests and scripts: a tiny config and CLI runners, the S3 server, pods, fake remotes."""
