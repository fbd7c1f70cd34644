"""Remote checkpoint storage: `objects` (the backend protocol), `s3` and `files` (the backends), `calls` (deadlines
and retries), `layout` (where things are under the remote root), `store` (checkpoints over objects: upload,
listing, retention), `archive` (moving checkpoints aside instead of deleting them), `pull` (resumable downloads)
and `uploader` (the background thread)."""
