"""Tests of one module at a time, laid out like the trainer package; no CLI run."""
