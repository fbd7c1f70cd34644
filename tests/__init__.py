"""The test suite: unit/ mirrors the trainer package, e2e/ runs the real CLI and processes, chaos/ the chaos proof."""
