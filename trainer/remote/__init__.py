"""Remote checkpoint storage: `objects` (the backend protocol), `s3` and `files` (the backends), `store`
(checkpoints over objects: upload, pull, retention, deadlines and retries) and `uploader` (the background
thread)."""
