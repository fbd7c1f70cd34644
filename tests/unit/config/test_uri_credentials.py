"""Credentials in a storage URI are refused with one line that repeats nothing of the URI (config validation and
every function that opens a store from one)."""

from __future__ import annotations

import pytest

from trainer.config.loader import load_config
from trainer.errors import ConfigError
from trainer.remote.store import open_store
from trainer.remote.uri import has_credentials

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY"  # an AWS-style secret: '/' and '+' in it

WITH = [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs/exp1",
    "s3://AKIAEXAMPLE:plainsecret@bucket",
    "s3://someone@bucket/prefix",
    f"file://user:{SECRET}@localhost/mnt/ckpts",
    f"http://minio:{SECRET}@127.0.0.1:9000",
    "https://storage.example.com/?X-Amz-Credential=AKIA/20240101&X-Amz-Signature=abc",
]
WITHOUT = [
    "s3://bucket/runs/exp1",
    "s3://bucket/runs/user@example.com/exp",  # an '@' in a key prefix is no credential
    "file:///mnt/ckpts/exp1",
    "http://127.0.0.1:9000",
    "https://s3.us-west-004.backblazeb2.com",
]


@pytest.mark.parametrize("uri", WITH)
def test_credentials_are_found(uri):
    assert has_credentials(uri)


@pytest.mark.parametrize("uri", WITHOUT)
def test_plain_uris_are_not_flagged(uri):
    assert not has_credentials(uri)


@pytest.mark.parametrize(
    "override,key",
    [
        (f"checkpoint.remote=s3://AKIAEXAMPLE:{SECRET}@bucket/runs/exp1", "checkpoint.remote"),
        (f"checkpoint.remote=AKIAEXAMPLE:{SECRET}@bucket/x", "checkpoint.remote"),  # no scheme: still refused first
        (f"checkpoint.s3.endpoint_url=http://minio:{SECRET}@127.0.0.1:9000", "checkpoint.s3.endpoint_url"),
    ],
)
def test_config_refuses_them_in_one_line_without_the_secret(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(f"{key}: the URI holds credentials") and "AWS_ACCESS_KEY_ID" in msg
    assert "checkpoint.s3.profile" in msg and "\n" not in msg
    assert SECRET not in msg and "AKIAEXAMPLE" not in msg and "plainsecret" not in msg


def test_open_store_refuses_them_before_anything_repeats_the_uri(tmp_path):
    for uri in (f"s3://AKIAEXAMPLE:{SECRET}@bucket/x", f"file://u:{SECRET}@localhost{tmp_path}", "gs://k:v@b/x"):
        with pytest.raises(ConfigError) as e:
            open_store(uri)
        assert SECRET not in str(e.value) and "k:v" not in str(e.value) and "credentials" in str(e.value)
    from trainer.config.schema import S3Config

    with pytest.raises(ConfigError, match="checkpoint.s3.endpoint_url: the URI holds credentials"):
        open_store(f"file://{tmp_path}", S3Config(endpoint_url=f"http://u:{SECRET}@host:9000"))
    assert open_store(f"file://{tmp_path}").uri == f"file://{tmp_path}"
