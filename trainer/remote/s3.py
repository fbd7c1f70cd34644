"""The S3 backend: objects under s3://bucket/prefix through one boto3 client and one transfer manager.

Works with AWS and S3-compatible stores (R2, B2, GCS's XML API, MinIO, SeaweedFS). Credentials come from boto3's
own chain (environment, profile, instance role); none is ever read from our config, logged or stored.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import boto3
import botocore.exceptions as bex
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from s3transfer.manager import TransferManager

from trainer.config.schema import S3Config
from trainer.errors import StorageError
from trainer.remote.objects import CredentialsRefused, DaemonPool, one_line, transient_os_error

_TRANSIENT_CODES = {
    "RequestTimeout",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "NoSuchUpload",
}  # a multipart upload the server lost (restart): upload the file again
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "AccountProblem",
    "Forbidden",
    "403",
}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}


def _code(e: bex.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: bex.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _digest(creds) -> str | None:
    """A fingerprint of credentials, to compare them without keeping another copy; None when they cannot be resolved
    now (a role's, deferred: the first request says what is wrong)."""
    try:
        frozen = creds.get_frozen_credentials()
    except Exception:
        return None
    text = "\0".join(str(x) for x in (frozen.access_key, frozen.secret_key, frozen.token))
    return hashlib.sha256(text.encode()).hexdigest()


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, bex.ClientError):
        return _status(e) >= 500 or _status(e) in (408, 429) or _code(e) in _TRANSIENT_CODES
    if isinstance(e, bex.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(e):
        return False
    if isinstance(e, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError)):
        return True
    # builtin ConnectionError/TimeoutError and our own call timeouts; permission problems are fatal
    return transient_os_error(e)


_SOURCES = {
    "env": "env",
    "shared-credentials-file": "profile",
    "config-file": "profile",
    "iam-role": "instance role",
    "container-role": "container role",
    "assume-role": "assume-role profile",
    "assume-role-with-web-identity": "web identity",
    "sso": "SSO",
    "custom-process": "credential_process",
}


class S3Objects:
    """Objects under s3://bucket/prefix through one boto3 client and one transfer manager."""

    def __init__(self, uri: str, bucket: str, prefix: str, cfg: S3Config):
        self.uri, self.bucket, self.prefix, self._cfg = uri.rstrip("/"), bucket, prefix, cfg
        self.endpoint = cfg.endpoint_url or "AWS S3"
        self.profile = cfg.profile or os.environ.get("AWS_PROFILE") or "default"
        session, creds = self._credentials()
        self._connect(session, creds)

    def _credentials(self):
        """(session, credentials) from boto3's chain, as it is now; StorageError when it has none."""
        try:
            session = boto3.session.Session(profile_name=self._cfg.profile)
            creds = session.get_credentials()
        except bex.ProfileNotFound:
            raise StorageError(
                f"{self.uri}: AWS profile {self._cfg.profile!r} not found in ~/.aws/config or "
                f"~/.aws/credentials; fix checkpoint.s3.profile"
            ) from None
        except bex.BotoCoreError as e:
            raise StorageError(
                f"{self.uri}: cannot load AWS credentials ({type(e).__name__}); check the "
                f"AWS_* environment variables and ~/.aws/config"
            ) from None
        if creds is None:
            raise StorageError(
                f"{self.uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"a profile (checkpoint.s3.profile or AWS_PROFILE) or an instance role"
            )
        return session, creds

    def _connect(self, session, creds) -> None:
        """One client and transfer manager signing with `creds` (kept as a digest only, to notice a change)."""
        cfg = self._cfg
        self.source = _SOURCES.get(creds.method, creds.method)
        self._creds_digest = _digest(creds)
        style = cfg.addressing_style
        if style == "auto":  # every S3-compatible store takes path-style; AWS prefers virtual-hosted
            style = "path" if cfg.endpoint_url else "auto"
        # New boto3 sends CRC trailers (aws-chunked) that GCS, B2 and older MinIO reject; we verify sha256 ourselves.
        compat = (
            {}
            if cfg.endpoint_url is None
            else {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
        )
        conf = BotoConfig(
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
            s3={"addressing_style": style},
            max_pool_connections=cfg.max_concurrency + 4,
            tcp_keepalive=True,
            user_agent_extra="spot-trainer",
            **compat,
        )
        self.client = session.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=conf)
        part = cfg.part_size_mb * 1024 * 1024
        self.transfers = TransferManager(
            self.client,
            TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=cfg.max_concurrency),
            executor_cls=DaemonPool,
        )

    def refresh_credentials(self) -> bool:
        """Ask boto3's chain again; with different credentials (new env or profile keys, a new session token), use a
        new client. Refreshable ones (roles, SSO) renew themselves; static ones are read once per client."""
        try:
            session, creds = self._credentials()
        except StorageError:  # none right now: keep the client we have
            return False
        digest = _digest(creds)
        changed = digest is not None and digest != self._creds_digest
        if changed:
            old = self.transfers
            self._connect(session, creds)
            # transfers still running on the old client finish there; its threads end with them
            threading.Thread(target=old.shutdown, args=(False,), name="s3-retire", daemon=True).start()
        return changed

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def list(self, rel_prefix: str) -> dict[str, int]:
        """Relative path -> size of every object under rel_prefix."""
        strip, out = len(self._key("")), {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(rel_prefix)
        ):
            out.update({o["Key"][strip:]: o["Size"] for o in page.get("Contents", [])})
        return out

    def sha256(self, rel: str) -> str | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["Metadata"].get("sha256")
        except bex.ClientError as e:
            if _status(e) == 404 and _code(e) != "NoSuchBucket":
                return None
            raise

    def read(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except bex.ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def write(self, rel: str, data: bytes, sha256: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, Metadata={"sha256": sha256})

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """Server-side copy (multipart above part_size_mb); the sha256 metadata goes with it."""
        self.transfers.copy(
            {"Bucket": self.bucket, "Key": self._key(src_rel)}, self.bucket, self._key(dst_rel)
        ).result()

    def delete(self, rels: list[str]) -> None:
        for rel in rels:  # one by one: GCS has no multi-object delete
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def put_files(self, items: list[tuple[Path, str, str]], wait: Callable) -> None:
        """Upload (local path, rel, sha256) items in parallel (multipart above part_size_mb)."""
        wait(
            [
                (
                    rel,
                    self.transfers.upload(
                        str(path), self.bucket, self._key(rel), extra_args={"Metadata": {"sha256": sha}}
                    ),
                )
                for path, rel, sha in items
            ]
        )

    def get_files(self, items: list[tuple[str, Path]], wait: Callable) -> None:
        wait([(rel, self.transfers.download(self.bucket, self._key(rel), str(path))) for rel, path in items])

    def is_missing(self, e: BaseException) -> bool:
        return isinstance(e, bex.ClientError) and _status(e) == 404 and _code(e) != "NoSuchBucket"

    def is_transient(self, e: BaseException) -> bool:
        return _is_transient(e)

    def explain(self, e: BaseException) -> StorageError | None:
        """A one-line StorageError for errors that retrying cannot fix; None for the others."""
        if isinstance(e, bex.NoCredentialsError):
            return CredentialsRefused(
                f"{self.uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"a profile or an instance role"
            )
        if isinstance(e, bex.SSLError) and not _is_transient(e):
            return StorageError(f"{self.uri}: TLS certificate of {self.endpoint} not trusted; set AWS_CA_BUNDLE")
        if not isinstance(e, bex.ClientError) or _is_transient(e):
            return None
        code, status = _code(e), _status(e)
        if code in _AUTH_CODES or status == 403:
            hints = {
                "env": "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
                "profile": f"check the keys of profile '{self.profile}' in ~/.aws/credentials",
                "instance role": "check the IAM role attached to this instance",
            }
            hint = hints.get(self.source, f"check the {self.source} credentials")
            if code == "AccessDenied":
                hint = "allow s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on this bucket and prefix"
            elif code in ("ExpiredToken", "InvalidToken"):
                hint = "refresh the credentials (AWS_SESSION_TOKEN or the profile's session)"
            return CredentialsRefused(
                f"{self.uri}: access denied with the credentials from {self.source} ({code or status}); {hint}"
            )
        if code in ("NoSuchBucket", "InvalidBucketName"):
            return StorageError(
                f"{self.uri}: bucket '{self.bucket}' does not exist at {self.endpoint} ({code}); "
                f"create it or fix checkpoint.remote / checkpoint.s3.endpoint_url"
            )
        if code in _REGION_CODES:
            return StorageError(f"{self.uri}: the bucket is in another region ({code}); set checkpoint.s3.region")
        if code == "RequestTimeTooSkewed":
            return StorageError(f"{self.uri}: this machine's clock is off ({code}); sync it (NTP) and restart")
        if code == "400" and status == 400:  # a HEAD's error has no body: S3's answer to an expired token there
            return CredentialsRefused(
                f"{self.uri}: HTTP 400 without a reason (to a HEAD request; an expired session token answers so); "
                f"refresh the credentials (AWS_SESSION_TOKEN or the profile's session)"
            )
        return StorageError(f"{self.uri}: {code or status} ({one_line(e)}); not retried")

    def close(self) -> None:
        # shutdown() waits for every transfer to end, so a stalled one would block it: bound the wait.
        closer = threading.Thread(target=self.transfers.shutdown, args=(True,), name="s3-close", daemon=True)
        closer.start()
        closer.join(timeout=2.0)
