"""Secrets kept in the database encrypted (Fernet: AES-128-CBC with an HMAC), with the key from
settings.FIELD_ENCRYPTION_KEY — outside the database, so a copy of it alone reveals nothing."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


class SecretUnreadable(Exception):
    """The stored secret was encrypted with another key (FIELD_ENCRYPTION_KEY changed)."""


def encrypt(text: str) -> str:
    return Fernet(settings.FIELD_ENCRYPTION_KEY.encode()).encrypt(text.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return Fernet(settings.FIELD_ENCRYPTION_KEY.encode()).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "A stored secret cannot be decrypted: FIELD_ENCRYPTION_KEY changed since it was saved. "
            "Enter the API key again."
        ) from None
