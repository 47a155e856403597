"""The admin token check: the right token only; an unset token turns admin off."""

from __future__ import annotations

from common.auth import check_admin_token


def test_only_the_right_token_passes() -> None:
    assert check_admin_token("s3cret", "s3cret")
    for given in ("", "wrong", "s3cre", "s3crett", "S3CRET", " s3cret"):
        assert not check_admin_token(given, "s3cret"), given


def test_an_unset_token_refuses_everything_even_the_empty_one() -> None:
    for given in ("", "anything"):
        assert not check_admin_token(given, "")


def test_tokens_beyond_ascii_compare_too() -> None:
    # hmac.compare_digest takes str of ASCII only; the check must not raise on others.
    assert check_admin_token("clé-ü", "clé-ü")
    assert not check_admin_token("clé-u", "clé-ü")
