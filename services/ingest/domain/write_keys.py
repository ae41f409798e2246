"""Write keys: generated with 240 bits of entropy, stored only as a SHA-256 digest.

A plain (unsalted) digest is enough for a random key of this length: nobody can guess the key from it,
and it lets the hot path find a key with one indexed lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets

KEY_PREFIX = "wk_"
# The key `make run` and docker-compose.yml seed: public in this repository, so never valid in production.
DEVELOPMENT_WRITE_KEY = "dev-write-key"
SHOWN_PREFIX_LENGTH = 10


def generate_write_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)


def hash_write_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """The public id of a key (in listings and as each event's `source`): part of its digest."""
    return key_hash[:16]


def shown_prefix(key: str) -> str:
    # Never most of a short (seeded) key: at most a quarter of it.
    return key[: min(SHOWN_PREFIX_LENGTH, len(key) // 4)]


def key_from_authorization(header: str | None) -> str | None:
    """The write key of an `Authorization` header: Basic (key as user name, Segment's way) or Bearer."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    scheme = scheme.lower()
    if scheme == "bearer":
        return value or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user = decoded.partition(":")[0]
        return user or None
    return None
