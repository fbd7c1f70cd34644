"""Checkpoints on the local disk: `manifest` (sha256 of every file, written last), `stream` (the streaming
safetensors writer), `store` + `writer` (temp dir, commit, retention; the background writer), `optimizer_state`
and `model_state` (what is saved), `progress` (trainer_state.json), and `checkpointer` (the component the
training loop holds)."""
