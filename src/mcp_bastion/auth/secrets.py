"""Opaque secrets (refresh tokens, authorization codes, API keys, client secrets) and their stored form.

The values are 256-bit random strings, so a plain SHA-256 is a sufficient stored form: there is nothing
to brute-force, and a fast hash lets the store look a secret up by its hash.
"""

from __future__ import annotations

import hashlib
import secrets as _random

SECRET_BYTES = 32


def new_secret(prefix: str = "") -> str:
    """``prefix`` followed by 43 URL-safe characters (32 random bytes, base64url without padding)."""
    return prefix + _random.token_urlsafe(SECRET_BYTES)


def hash_secret(s: str) -> str:
    """The stored form of a secret: SHA-256 of its UTF-8 bytes, as 64 lowercase hex characters."""
    return hashlib.sha256(s.encode()).hexdigest()


def same_secret(stored_hash: str | None, presented: str) -> bool:
    """Constant-time comparison of a presented secret with a stored hash (False when nothing is stored)."""
    if not stored_hash:
        return False
    return _random.compare_digest(stored_hash, hash_secret(presented))
