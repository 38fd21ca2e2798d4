"""Secrets at rest: salted slow hashes, constant-time checks."""

from __future__ import annotations

from server import secrets


def test_production_cost_is_scrypt_2_14() -> None:
    # The session fixture lowers SCRYPT_N for speed; the module's own default is this.
    assert secrets.DEFAULT_SCRYPT_N == 2**14


def test_hash_verifies_only_its_secret() -> None:
    stored = secrets.hash_secret("correct horse")
    assert secrets.verify_secret("correct horse", stored)
    assert not secrets.verify_secret("correct hors", stored)
    assert not secrets.verify_secret("", stored)


def test_hashes_are_salted_and_carry_their_parameters() -> None:
    first, second = secrets.hash_secret("same"), secrets.hash_secret("same")
    assert first != second
    scheme, n, r, p, _salt, _digest = first.split("$")
    assert (scheme, int(r), int(p)) == ("scrypt", 8, 1)
    assert int(n) == secrets.SCRYPT_N
    assert "same" not in first


def test_malformed_hashes_never_verify() -> None:
    for stored in ("", "plain", "md5$1$2$3$4$5", "scrypt$x$8$1$AA==$AA=="):
        assert not secrets.verify_secret("anything", stored)


def test_tokens_are_random_and_looked_up_by_digest() -> None:
    token = secrets.new_secret()
    assert len(token) >= 43 and token != secrets.new_secret()
    assert secrets.token_digest(token) == secrets.token_digest(token)
    assert len(secrets.token_digest(token)) == 64
