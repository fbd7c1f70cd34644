"""Tests of trainer.plan."""
