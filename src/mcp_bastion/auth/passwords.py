"""Local users' passwords: argon2id through argon2-cffi, with its current recommended parameters."""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verifying unknown users against this costs as much as a real check, so timing does not reveal
    which user names exist (made on first use: hashing is deliberately slow)."""
    return _hasher.hash("mcp-bastion: no such user")


MAX_PASSWORD_CHARS = 1024


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("the password is empty")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_CHARS} characters")
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; ``stored_hash`` None checks against a dummy hash (always False)."""
    if len(password) > MAX_PASSWORD_CHARS:  # never a valid password; still spend the time
        stored_hash, password = None, password[:MAX_PASSWORD_CHARS]
    try:
        ok = _hasher.verify(stored_hash or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return ok and stored_hash is not None


def needs_rehash(stored_hash: str) -> bool:
    """True when the hash was made with weaker parameters than the current ones."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True
