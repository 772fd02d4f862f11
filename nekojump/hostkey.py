"""The SSH host key: made once on first start, then the same forever."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key

from nekojump.keys import fingerprint_of_blob

HOST_KEY_NAME = "ssh_host_ed25519_key"


class UnusableHostKey(Exception):
    """The host key file is there but cannot be read as a private key."""


def load_or_create_host_key(data_dir: Path) -> Key:
    """The ed25519 host key in ``data_dir``, generated (mode 0600) if missing.

    A key file that is there but unusable is never replaced: members'
    ``known_hosts`` pin the key, so a new one would warn every one of them of an
    impostor.  It raises ``UnusableHostKey``, naming the file, instead."""
    path = data_dir / HOST_KEY_NAME
    if path.exists():
        try:
            return Key.fromFile(str(path))
        except Exception as error:  # noqa: BLE001 - whatever is wrong with it, say which file
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise UnusableHostKey(
                f"cannot use the SSH host key {path}: {reason}. Restore it from a backup: "
                "members' known_hosts pin it (remove it only to make a new one, and tell "
                "every member to accept the new fingerprint)"
            ) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    key = Key(ed25519.Ed25519PrivateKey.generate())
    scratch = path.with_suffix(".new")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(key.toString("OPENSSH"))
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(scratch, path)
    public = key.public().toString("OPENSSH") + b" nekojump-host-key\n"
    path.with_name(HOST_KEY_NAME + ".pub").write_bytes(public)
    return key


def host_key_fingerprint(key: Key) -> str:
    """``SHA256:...`` of the host key, as ``ssh-keygen -l`` and ``ssh`` print it."""
    return fingerprint_of_blob(key.public().blob())
