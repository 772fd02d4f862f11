"""Parse and vet pasted SSH public keys; results, not exceptions."""

from __future__ import annotations

import base64
import binascii
import re
import struct
from functools import lru_cache

from attrs import frozen
from twisted.conch.ssh.keys import BadKeyError, FingerprintFormats, Key

from nekojump.model import Refused

#: Key types members may register, with the label the dashboard shows.
ACCEPTED_TYPES = {
    "ssh-ed25519": "ED25519",
    "ecdsa-sha2-nistp256": "ECDSA",
    "ecdsa-sha2-nistp384": "ECDSA",
    "ecdsa-sha2-nistp521": "ECDSA",
    "ssh-rsa": "RSA",
    "sk-ssh-ed25519@openssh.com": "ED25519-SK",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK",
}
MIN_RSA_BITS = 2048
#: OpenSSH's largest RSA key (SSH_RSA_MAXIMUM_MODULUS_SIZE).
MAX_RSA_BITS = 16384
#: The largest RSA public exponent taken (ssh-keygen uses 65537).
MAX_RSA_EXPONENT = 2**32
#: The longest key description (a machine's name) a member may give.
MAX_DESCRIPTION = 100

#: Text found only in private keys: OpenSSH and PEM headers ("BEGIN OPENSSH PRIVATE
#: KEY", "BEGIN RSA PRIVATE KEY", "BEGIN SSH2 ENCRYPTED PRIVATE KEY", ...) and the
#: lines of a PuTTY ``.ppk`` file, which starts with the public half.
PRIVATE_KEY_MARKERS = ("PRIVATE KEY", "PuTTY-User-Key-File-", "Private-Lines:", "Private-MAC:")


#: "openssh-key-v1", base64-encoded: how the body of every OpenSSH private key
#: file starts, also when its BEGIN/END lines were left out.
OPENSSH_PRIVATE_BODY = "b3BlbnNzaC1rZXktdjE"


def contains_private_key(text: str) -> bool:
    """True if ``text`` holds (part of) a private key: never store, log or echo it."""
    return OPENSSH_PRIVATE_BODY in text or any(m in text for m in PRIVATE_KEY_MARKERS)


#: A long run of base64 and nothing else, not starting like a public key blob
#: ("AAAA": the length of its type name): the body of some other key file, such
#: as a PEM private key without its BEGIN/END lines.
_BARE_BASE64 = re.compile(r"(?!AAAA)[A-Za-z0-9+/=]{60,}")


def safe_to_echo(text: str) -> bool:
    """True if a refused form field may be shown back to fix it: one line (a public
    key is one line; a private key, armoured or not, is many), no private key in
    it, and no bare block of base64 but a public key's (a PEM private key's body)."""
    line = text.strip()
    return "\n" not in line and not contains_private_key(line) and not _BARE_BASE64.fullmatch(line)


@frozen
class PublicKey:
    """A vetted public key, ready to store."""

    key_type: str
    blob: bytes
    comment: str
    bits: int

    @property
    def openssh(self) -> str:
        """The key as one ``authorized_keys`` line, without comment."""
        return f"{self.key_type} {base64.b64encode(self.blob).decode('ascii')}"

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` exactly as ``ssh-keygen -l`` prints it."""
        return fingerprint_of_blob(self.blob)

    @property
    def label(self) -> str:
        """Short type name for people, e.g. ``ED25519``."""
        return ACCEPTED_TYPES[self.key_type]


#: The longest key blob looked at: an RSA key of the largest size OpenSSH
#: accepts (16384 bits) takes about 2 KiB.
MAX_KEY_BLOB = 4096


def fingerprint_of_blob(blob: bytes) -> str:
    """``SHA256:`` plus unpadded base64, as ``ssh-keygen -l`` prints it, of the
    key in ``blob`` (``BadKeyError`` if there is none, see ``key_from_blob``).

    Remembered for the last keys asked about: every login asks for its key's
    fingerprint, and the same keys log in again and again."""
    return _remembered_fingerprint(blob)


def key_from_blob(blob: bytes) -> FixedKey:
    """The public key whose SSH wire encoding (RFC 4253 section 6.6) is exactly
    ``blob``; ``BadKeyError`` if it is none, too long, or has bytes after it.

    Only that encoding is tried: ``Key.fromString`` without a type guesses
    among private key formats too, and checking an RSA "private key" a client
    made up costs a primality test of numbers as large as it likes.
    Remembered like ``fingerprint_of_blob``."""
    if len(blob) > MAX_KEY_BLOB:
        raise BadKeyError("key blob too long")
    return _remembered_key(blob)


#: Size of an uncompressed point (0x04, x, y) on each curve SSH keys use.
EC_POINT_SIZES = {b"nistp256": 65, b"nistp384": 97, b"nistp521": 133}


@lru_cache(maxsize=1024)
def _remembered_key(blob: bytes) -> FixedKey:
    try:
        key_type, end = read_string(blob)
        if key_type.startswith((b"ecdsa-sha2-", b"sk-ecdsa-sha2-")):
            curve, end = read_string(blob, end)
            point, _ = read_string(blob, end)
            if len(point) != EC_POINT_SIZES.get(curve) or point[0] != 4:
                # OpenSSL would decompress a compressed point first: a square root.
                raise BadKeyError("not an uncompressed point on a known curve")
    except ValueError:
        raise BadKeyError("not a public key blob (cut short)") from None
    try:
        key = FixedKey.fromString(blob, type="blob")
    except BadKeyError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the parser trips on: no key
        raise BadKeyError(f"not a public key blob ({type(error).__name__})") from None
    if key.blob() != blob:
        raise BadKeyError("not a public key blob (bytes after the key, or another encoding)")
    if key.type() == "RSA" and key.data()["e"] > MAX_RSA_EXPONENT:
        # Stored before the dashboard refused them: no key to check signatures with.
        raise BadKeyError("RSA public exponent over 2**32")
    return key


@lru_cache(maxsize=1024)
def _remembered_fingerprint(blob: bytes) -> str:
    return _fingerprint(key_from_blob(blob))


def read_string(data: bytes, start: int = 0) -> tuple[bytes, int]:
    """The SSH string at ``start`` in ``data`` and where it ends; ``ValueError``
    if it is cut short."""
    end = start + 4
    if end > len(data):
        raise ValueError("truncated string")
    end += int.from_bytes(data[start:end], "big")
    if end > len(data):
        raise ValueError("truncated string")
    return data[start + 4 : end], end


def read_strings(data: bytes, start: int = 0) -> list[bytes]:
    """The SSH strings that make up ``data`` from ``start`` to its end;
    ``ValueError`` if the last one is cut short."""
    strings = []
    while start < len(data):
        string, start = read_string(data, start)
        strings.append(string)
    return strings


def _fingerprint(key: Key) -> str:
    return "SHA256:" + key.fingerprint(FingerprintFormats.SHA256_BASE64).rstrip("=")


class FixedKey(Key):
    """A ``Key`` that works out its type and blob once.

    Conch asks a key for its type, a chain of ``isinstance`` checks against
    abstract classes, about twenty times per login (the host key's for the
    key exchange, the member's for the signature), and serializes the host
    key's blob twice per key exchange.  Keys do not change, so the answers
    are kept.
    """

    _type: str | None = None
    _blob: bytes | None = None

    @classmethod
    def of(cls, key: Key) -> FixedKey:
        """``key`` as a ``FixedKey`` (the same key object underneath)."""
        if isinstance(key, FixedKey):
            return key
        fixed = cls.__new__(cls)
        fixed.__dict__.update(key.__dict__)
        return fixed

    def type(self) -> str:
        if self._type is None:
            self._type = super().type()
        return self._type

    def blob(self) -> bytes:
        if self._blob is None:
            self._blob = super().blob()
        return self._blob

    def public(self) -> FixedKey:
        return FixedKey.of(super().public())


def key_description(description: str, comment: str) -> str:
    """The description to store: the member's, else the key's comment cut to
    ``MAX_DESCRIPTION`` characters (a long comment is no reason to refuse a key)."""
    return description.strip() or comment.strip()[:MAX_DESCRIPTION]


def parse_public_key(text: str) -> PublicKey | Refused:
    """Vet one pasted public key (an ``id_*.pub`` file or authorized_keys line).

    Refuses private keys, more than one key, malformed text, DSA, RSA under
    2048 bits and types Conch cannot verify.  Leading ``authorized_keys``
    options are dropped: restrictions are nekojump's job.
    """
    text = text.strip()
    if not text:
        return Refused("key-empty", "paste your public key (the .pub file)")
    if contains_private_key(text):
        return Refused(
            "key-is-private",
            "this is a private key — paste the .pub file instead "
            "(e.g. cat ~/.ssh/nekotopia_jump.pub); the private half never "
            "leaves your machine",
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines[0] == RFC4716_BEGIN:
        return _from_rfc4716(lines)
    if len(lines) > 1:
        return Refused("key-multiple", "paste exactly one public key, on one line")

    fields = lines[0].split()
    for index, field in enumerate(fields[:-1]):
        if field in ACCEPTED_TYPES or field == "ssh-dss" or _looks_like_type(field):
            return _vet(field, fields[index + 1], " ".join(fields[index + 2 :]))
    return Refused(
        "key-malformed",
        "this does not look like an SSH public key; it should start with "
        "ssh-ed25519, ecdsa-sha2-… or ssh-rsa",
    )


RFC4716_BEGIN = "---- BEGIN SSH2 PUBLIC KEY ----"
RFC4716_END = "---- END SSH2 PUBLIC KEY ----"


def _from_rfc4716(lines: list[str]) -> PublicKey | Refused:
    """A key in the RFC 4716 format PuTTYgen's "Save public key" and
    ``ssh-keygen -e`` write: header lines ("Comment: ...", continued by a
    trailing backslash), then the key's base64 over several lines."""
    if RFC4716_END not in lines:
        return Refused(
            "key-malformed",
            f"this PuTTY/SSH2 public key file is cut short: copy all of it, down to {RFC4716_END}",
        )
    end = lines.index(RFC4716_END)
    if end != len(lines) - 1:
        return Refused("key-multiple", "paste exactly one public key")
    body = lines[1:end]
    comment = ""
    while body and (":" in body[0] or body[0].endswith("\\")):
        header = body.pop(0)
        while header.endswith("\\") and body:
            header = header[:-1] + body.pop(0)
        tag, _, value = header.partition(":")
        if tag.strip().lower() == "comment":
            comment = value.strip().strip('"')
    data = "".join(body)
    try:
        key_type = read_string(base64.b64decode(data, validate=True))[0].decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return Refused("key-malformed", "the key data is damaged or incomplete")
    return _vet(key_type, data, comment)


def _looks_like_type(field: str) -> bool:
    return field.startswith(("ssh-", "ecdsa-", "sk-"))


def _vet(key_type: str, data: str, comment: str) -> PublicKey | Refused:
    if key_type == "ssh-dss":
        return Refused("key-weak", "DSA keys are no longer safe; use ssh-keygen -t ed25519")
    if key_type not in ACCEPTED_TYPES:
        return Refused("key-unsupported", f"key type {key_type} is not supported")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return Refused("key-malformed", "the key data is damaged or incomplete")
    if len(blob) > MAX_KEY_BLOB:
        return Refused("key-malformed", "the key data is far too long for a public key")
    try:
        key = Key.fromString(blob, type="blob")
    except (ValueError, BadKeyError, IndexError, TypeError, struct.error):
        return Refused("key-malformed", "the key data is damaged or incomplete")
    if key.blob() != blob:
        return Refused(
            "key-malformed",
            "the key data has extra bytes after the key; copy the line from the .pub file again",
        )
    if not key.isPublic():  # pragma: no cover - a blob is always public
        return Refused("key-is-private", "this is a private key — paste the .pub file instead")
    if key.sshType().decode("ascii") != key_type:
        return Refused(
            "key-malformed", "the key type does not match the key data; copy the line again"
        )
    bits = key.size()
    if key_type == "ssh-rsa" and bits < MIN_RSA_BITS:
        return Refused(
            "key-weak",
            f"RSA keys need at least {MIN_RSA_BITS} bits (this one has {bits}); "
            "use ssh-keygen -t ed25519",
        )
    if key_type == "ssh-rsa" and bits > MAX_RSA_BITS:
        return Refused(
            "key-malformed",
            f"RSA keys may have at most {MAX_RSA_BITS} bits, as in OpenSSH "
            f"(this one has {bits}); use ssh-keygen -t ed25519",
        )
    if key_type == "ssh-rsa" and key.data()["e"] > MAX_RSA_EXPONENT:
        # ssh-keygen makes 65537; a huge one costs milliseconds per signature check,
        # and anyone who knows the public key can ask for checks.
        return Refused(
            "key-malformed",
            "this RSA key has an unusual public exponent; use ssh-keygen -t ed25519",
        )
    return PublicKey(key_type=key_type, blob=blob, comment=comment.strip(), bits=bits)
