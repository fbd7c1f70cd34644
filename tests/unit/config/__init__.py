"""Tests of trainer.config."""
