"""The `spot-trainer` command line: `options` (what every command takes, one-line errors), `main` (the group
and the run commands) and `ckpt` (the checkpoint commands)."""
