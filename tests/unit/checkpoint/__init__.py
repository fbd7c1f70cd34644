"""Tests of trainer.checkpoint."""
