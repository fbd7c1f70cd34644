"""Checkpoint upload/download throughput through trainer.storage (multipart, sha256-verified).

    python scripts/bench_upload.py                      # a local SeaweedFS server (loopback), 200 MB
    python scripts/bench_upload.py --uri s3://bucket/bench --endpoint-url https://...   # a real store

Credentials for --uri come from boto3's chain (env, profile, instance role).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from trainer.checkpoint.manifest import build_manifest, write_manifest  # noqa: E402
from trainer.config.schema import S3Config  # noqa: E402
from trainer.remote.store import open_store  # noqa: E402


def make_checkpoint(root: Path, size_mb: int) -> Path:
    ckpt = root / "step-00000001"
    ckpt.mkdir(parents=True)
    with open(ckpt / "model.safetensors", "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
    write_manifest(ckpt, build_manifest(ckpt, 1))
    return ckpt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--part-size-mb", type=int, default=S3Config.part_size_mb)
    p.add_argument("--max-concurrency", type=int, default=S3Config.max_concurrency)
    p.add_argument("--uri", default=None, help="s3://bucket/prefix (default: a local SeaweedFS server)")
    p.add_argument("--endpoint-url", default=None)
    args = p.parse_args()

    server = None
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        tmp = Path(tmp)
        if args.uri is None:
            from conftest import SeaweedServer  # the test fixture's server

            server = SeaweedServer(tmp / "seaweedfs")
            server.start()
            os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
            uri, endpoint = f"s3://{server.bucket()}/bench", server.endpoint_url
        else:
            uri, endpoint = args.uri, args.endpoint_url
        try:
            store = open_store(
                uri,
                S3Config(endpoint_url=endpoint, part_size_mb=args.part_size_mb, max_concurrency=args.max_concurrency),
            )
            store.check()  # as the trainer does at start (also warms up a new bucket)
            ckpt = make_checkpoint(tmp / "local", args.size_mb)
            size = (ckpt / "model.safetensors").stat().st_size
            up = store.upload_checkpoint(ckpt)
            again = store.upload_checkpoint(ckpt)
            t0 = time.monotonic()
            store.download_checkpoint(1, tmp / "pulled")
            down_s = time.monotonic() - t0
            store.delete_checkpoint(1)
            store.close()
        finally:
            if server is not None:
                server.kill()

    mb = size / (1 << 20)
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable] + sys.argv)}")
    print(
        f"store: {uri} ({'local SeaweedFS on loopback' if server else endpoint or 'AWS S3'}), "
        f"part size {args.part_size_mb} MiB, max_concurrency {args.max_concurrency}, {os.cpu_count()} CPUs"
    )
    print(f"upload:   {mb:.0f} MiB in {up.seconds:.2f} s = {mb / up.seconds:.0f} MiB/s (multipart, sha256 metadata)")
    print(f"download: {mb:.0f} MiB in {down_s:.2f} s = {mb / down_s:.0f} MiB/s (parallel ranges, sha256 verified)")
    print(f"re-upload of the same checkpoint: {again.seconds:.3f} s, {again.bytes_uploaded} bytes sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
