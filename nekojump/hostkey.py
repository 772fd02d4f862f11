"""The SSH host key: made once on first start, then the same forever."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key

from nekojump.keys import fingerprint_of_blob

HOST_KEY_NAME = "ssh_host_ed25519_key"


def load_or_create_host_key(data_dir: Path) -> Key:
    """The ed25519 host key in ``data_dir``, generated (mode 0600) if missing."""
    path = data_dir / HOST_KEY_NAME
    if path.exists():
        return Key.fromFile(str(path))
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
