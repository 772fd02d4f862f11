"""Dashboard passwords: salted scrypt (memory-hard, in the standard library)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash``; slow on purpose, so call it off the reactor thread."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """True if ``password`` matches ``stored``; a missing hash never matches.

    Without a stored hash we still do the work, so timing does not reveal
    which accounts exist.
    """
    if not stored:
        hash_password(password)
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode("utf-8"),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)
