"""Vetting pasted public keys: what members paste, and the message they get back."""

import base64
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from twisted.conch.ssh.keys import Key

from nekojump.keys import FixedKey, key_from_blob, parse_public_key
from nekojump.model import Refused
from tests.conftest import tool


def openssh_public(private) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def openssh_private(private) -> str:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


ED25519 = ed25519.Ed25519PrivateKey.generate()


@pytest.mark.parametrize(
    ("private", "label"),
    [
        (ED25519, "ED25519"),
        (ec.generate_private_key(ec.SECP256R1()), "ECDSA"),
        (ec.generate_private_key(ec.SECP384R1()), "ECDSA"),
        (rsa.generate_private_key(65537, 2048), "RSA"),
    ],
)
def test_accepted_types(private, label):
    key = parse_public_key(openssh_public(private) + " me@laptop\n")
    assert not isinstance(key, Refused), key
    assert key.label == label
    assert key.comment == "me@laptop"


def test_fingerprint_matches_ssh_keygen(tmp_path):
    path = tmp_path / "id.pub"
    path.write_text(openssh_public(ED25519) + " c\n")
    printed = subprocess.run(
        [tool("ssh-keygen"), "-lf", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert parse_public_key(path.read_text()).fingerprint == printed


def test_authorized_keys_options_are_dropped():
    line = 'no-pty,command="/bin/sh" ' + openssh_public(ED25519) + " laptop"
    key = parse_public_key(line)
    assert key.openssh == openssh_public(ED25519)
    assert key.comment == "laptop"


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("", "key-empty", "paste your public key"),
        (openssh_private(ED25519), "key-is-private", "paste the .pub file"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
            "key-is-private",
            "private key",
        ),
        ("hello world", "key-malformed", "does not look like an SSH public key"),
        ("ssh-ed25519 AAAA!!!notbase64", "key-malformed", "damaged"),
        (
            "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519").decode(),
            "key-malformed",
            "damaged",
        ),
        (openssh_public(dsa.generate_private_key(1024)), "key-weak", "DSA"),
        (openssh_public(rsa.generate_private_key(65537, 1024)), "key-weak", "2048 bits"),
        (openssh_public(ED25519) + "\n" + openssh_public(ED25519), "key-multiple", "exactly one"),
        (
            "ssh-ed25519 " + openssh_public(rsa.generate_private_key(65537, 2048)).split()[1],
            "key-malformed",
            "does not match",
        ),
        ("ssh-foo AAAAB3NzaC1yc2E=", "key-unsupported", "not supported"),
    ],
)
def test_refusals_say_what_to_do(text, code, words):
    result = parse_public_key(text)
    assert isinstance(result, Refused)
    assert result.code == code
    assert words in result.reason


def test_private_key_text_never_appears_in_the_message():
    private = openssh_private(ED25519)
    result = parse_public_key(private)
    body = private.splitlines()[1]
    assert body not in result.reason


def test_a_fixed_key_answers_like_the_key_it_fixes(tmp_path):
    """Host and member keys whose type and blob are kept behave as Conch's own."""
    for private in (
        Key(ed25519.Ed25519PrivateKey.generate()),
        Key(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        Key(ec.generate_private_key(ec.SECP256R1())),
    ):
        fixed = FixedKey.of(private)
        public = fixed.public()
        assert isinstance(public, FixedKey) and public == private.public()
        assert (fixed.type(), fixed.sshType(), fixed.blob()) == (
            private.type(),
            private.sshType(),
            private.blob(),
        )
        assert key_from_blob(public.blob()) == public
        algorithm = fixed.supportedSignatureAlgorithms()[0]
        signature = fixed.sign(b"exchange hash", algorithm)
        assert key_from_blob(fixed.blob()).verify(signature, b"exchange hash")
        assert not key_from_blob(fixed.blob()).verify(signature, b"another hash")


def test_a_key_blob_is_only_ever_read_as_one_public_key_blob():
    """A client may send anything as its key: no guessing among other formats
    (an RSA "private key" made up by a client costs a primality test), nothing
    after the key, nothing longer than a public key can be."""
    from twisted.conch.ssh.keys import BadKeyError

    from nekojump import keys

    private = Key(ed25519.Ed25519PrivateKey.generate())
    public = private.public()
    assert key_from_blob(public.blob()) == public
    for bogus in [
        public.blob() + b"\0",
        public.toString("OPENSSH"),  # an authorized_keys line
        private.toString("OPENSSH"),  # a private key file
        b"(",  # Conch would guess an lsh key and trip over an assertion
        b"\0\0\0\x07ssh-rsa" + b"\xff" * keys.MAX_KEY_BLOB,
    ]:
        with pytest.raises(BadKeyError):
            key_from_blob(bogus)
        with pytest.raises(BadKeyError):
            keys.fingerprint_of_blob(bogus)


def test_a_pasted_key_is_read_as_a_public_key_only(monkeypatch):
    """An RSA "private key" in Conch's agent format, pasted as the data of an
    ssh-rsa line, is not checked as one (that costs a primality test of primes
    as large as the paster likes)."""
    from twisted.conch.ssh.common import MP, NS

    guessed = []
    monkeypatch.setattr(Key, "_fromString_AGENTV3", classmethod(lambda cls, b: guessed.append(b)))
    p, q = 2**127 - 1, 2**89 - 1
    blob = NS(b"ssh-rsa") + MP(65537) + MP(3) + MP(p * q) + MP(pow(q, -1, p)) + MP(p) + MP(q)
    refused = parse_public_key("ssh-rsa " + base64.b64encode(blob).decode())
    assert isinstance(refused, Refused) and refused.code == "key-malformed"
    assert guessed == []


def test_rsa_keys_with_a_huge_public_exponent_are_refused():
    """Checking a signature by one costs milliseconds, and anyone who knows the
    public key can ask for checks."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    ordinary = Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    modulus = ordinary.public().data()["n"]
    huge = Key(RSAPublicNumbers(2**2047 + 1, modulus).public_key())
    refused = parse_public_key(huge.toString("OPENSSH").decode())
    assert isinstance(refused, Refused) and "public exponent" in refused.reason
    assert not isinstance(parse_public_key(ordinary.public().toString("OPENSSH").decode()), Refused)


def test_rsa_keys_larger_than_openssh_takes_are_refused():
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    modulus = (1 << 16999) | 1  # odd and 17000 bits: a key to the parser
    huge = Key(RSAPublicNumbers(65537, modulus).public_key())
    refused = parse_public_key(huge.toString("OPENSSH").decode())
    assert isinstance(refused, Refused) and "at most 16384 bits" in refused.reason


def putty_private_key(version: int = 3) -> str:
    """A PuTTY ``.ppk`` file as Windows users have it: public lines, then private ones."""
    blob = openssh_public(ED25519).split()[1]
    return (
        f"PuTTY-User-Key-File-{version}: ssh-ed25519\n"
        "Encryption: none\n"
        "Comment: alice@laptop\n"
        "Public-Lines: 2\n"
        f"{blob[:64]}\n{blob[64:]}\n"
        "Private-Lines: 1\n"
        "AAAAIBtOP5XzKcWEKYhq0x1BIXeY4TSc3rOt9ioXKq7IKJk7SECRETSECRET\n"
        "Private-MAC: 6f0d4c0e0aa4bb6ac7b1d0c6bd7f5d9a2e1a9c4c1f7b1e0d7c8b9a0f1e2d3c4b\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        putty_private_key(2),
        putty_private_key(3),
        "Private-Lines: 1\nAAAAIBtOP5XzKcWEKYhq0x1BIXeY4TSc3rOt9ioXKq7IKJk7\n",
        "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nP2/56wAAAi4AAAA3\n"
        "---- END SSH2 ENCRYPTED PRIVATE KEY ----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0w\n",
    ],
    ids=["ppk-v2", "ppk-v3", "ppk-private-lines-only", "ssh2-encrypted", "openssh", "pkcs8"],
)
def test_private_keys_in_every_common_format_are_recognised(text):
    result = parse_public_key(text)
    assert isinstance(result, Refused)
    assert result.code == "key-is-private"
    assert "paste the .pub file" in result.reason
    assert "SECRET" not in result.reason


def test_a_key_blob_with_bytes_after_the_key_is_refused():
    """ssh-keygen would show another fingerprint for it than the one we would store."""
    key_type, data = openssh_public(ED25519).split()[:2]
    padded = base64.b64encode(base64.b64decode(data) + b"JUNKJUNK").decode()
    result = parse_public_key(f"{key_type} {padded} laptop")
    assert isinstance(result, Refused)
    assert result.code == "key-malformed"
    assert "extra bytes after the key" in result.reason


def test_a_putty_or_ssh_keygen_e_public_key_file_is_read_with_its_comment(tmp_path):
    """RFC 4716, as PuTTYgen's "Save public key" and ``ssh-keygen -e`` write it,
    with a header continued over two lines."""
    key_file = tmp_path / "k"
    subprocess.run(
        [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True
    )
    openssh = parse_public_key(key_file.with_suffix(".pub").read_text())
    exported = subprocess.run(
        [tool("ssh-keygen"), "-e", "-f", f"{key_file}.pub"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = exported.splitlines()
    lines[1] = 'Comment: "my \\\n windows pc"'
    key = parse_public_key("\r\n".join(lines))
    assert key == openssh.__class__(openssh.key_type, openssh.blob, "my windows pc", 256)
    assert parse_public_key(exported * 2).code == "key-multiple"
    assert parse_public_key("\n".join(lines[:-1])).code == "key-malformed"
