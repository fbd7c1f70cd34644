"""Tests of trainer.remote."""
