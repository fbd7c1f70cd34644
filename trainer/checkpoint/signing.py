"""Signed manifests (checkpoint.sign_key_env): an HMAC-SHA256 over the manifest's content, so a bucket someone else
can write cannot feed a run state it did not write.

The manifest lists the size and sha256 of every file, so signing it signs the whole checkpoint. The key comes from
the environment variable the config names; it lives only in this process's memory: never in config.yaml, events,
logs or an error message. With a key, an unsigned or badly signed checkpoint is refused (skipped and kept, never
deleted); without one, signatures are neither checked nor written, and signed checkpoints read as before.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from trainer.checkpoint.manifest import Manifest
from trainer.errors import ConfigError

ALG = "hmac-sha256"
MIN_KEY_CHARS = 16
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def looks_like_a_key(name: str) -> bool:
    """A key pasted where its variable's name goes (hex, or long, mixed case and digit-heavy): never echoed."""
    if re.fullmatch(r"[0-9A-Fa-f]{16,}", name):
        return True
    mixed = any(c.islower() for c in name) and any(c.isupper() for c in name)
    return len(name) >= 16 and mixed and sum(c.isdigit() for c in name) >= 4


def key_id(key: bytes) -> str:
    """What a signature records about its key: enough to tell keys apart, nothing to recover it from."""
    return hashlib.sha256(key).hexdigest()[:8]


class Signer:
    """Signs manifests and checks their signatures with one key (held here only; its repr does not show it)."""

    __slots__ = ("_key", "key_id", "env")

    def __init__(self, key: bytes, env: str = "the key's environment variable"):
        self._key, self.key_id, self.env = key, key_id(key), env

    def __repr__(self) -> str:
        return f"Signer(env={self.env!r}, key_id={self.key_id!r})"

    def _mac(self, manifest: Manifest) -> str:
        return hmac.new(self._key, manifest.canonical(), hashlib.sha256).hexdigest()

    def sign(self, manifest: Manifest) -> Manifest:
        """Set the manifest's signature (over all its other fields) and return it."""
        manifest.signature = {"alg": ALG, "key_id": self.key_id, "value": self._mac(manifest)}
        return manifest

    def problem(self, manifest: Manifest) -> str | None:
        """Why the manifest is not trusted (one line without the key), or None when its signature verifies."""
        sig = manifest.signature
        if sig is None:
            return f"not signed ({self.env} is set: only checkpoints signed with its key are used); kept as it is"
        if sig.get("alg") != ALG:
            return f"signed with {str(sig.get('alg'))[:20]!r}, not {ALG}; refused, kept as it is"
        if sig.get("key_id") != self.key_id:
            return (
                f"signed with another key (key id {str(sig.get('key_id'))[:16]}, {self.env}'s is {self.key_id}); "
                f"refused, kept as it is"
            )
        if not hmac.compare_digest(str(sig.get("value")), self._mac(manifest)):
            return "bad signature: the manifest changed after it was signed, or was forged; refused, kept as it is"
        return None


def check_env_name(name: str | None) -> None:
    """checkpoint.sign_key_env holds the NAME of a variable; the message never repeats a value that may be the key."""
    if name is not None and (not ENV_NAME_RE.fullmatch(name) or looks_like_a_key(name)):
        raise ConfigError(
            "checkpoint.sign_key_env: give the NAME of an environment variable that holds the key (e.g. "
            "SPOT_TRAINER_SIGN_KEY), not the key itself; keep the key out of config files"
        )


def from_env(name: str | None) -> Signer | None:
    """The signer for checkpoint.sign_key_env (None: signing off); ConfigError naming the variable if it is unset."""
    if name is None:
        return None
    check_env_name(name)
    value = os.environ.get(name, "")
    if not value.strip():
        raise ConfigError(
            f"checkpoint.sign_key_env: environment variable {name} is not set or empty; export the signing key "
            f"in it (e.g. {name}=$(openssl rand -hex 32)), or unset checkpoint.sign_key_env to turn signing off"
        )
    if len(value) < MIN_KEY_CHARS:
        raise ConfigError(
            f"checkpoint.sign_key_env: the key in {name} is shorter than {MIN_KEY_CHARS} characters; use a long "
            f"random one (e.g. openssl rand -hex 32)"
        )
    return Signer(value.encode(), env=name)


def from_config(checkpoint_cfg) -> Signer | None:
    """The signer a run's CheckpointConfig asks for (None: signing off)."""
    return from_env(checkpoint_cfg.sign_key_env)
