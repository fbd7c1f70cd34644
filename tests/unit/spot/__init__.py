"""Tests of trainer.spot."""
