"""The chaos proof (scripts/chaos.py) as a test."""
