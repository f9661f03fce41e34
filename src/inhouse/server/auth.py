"""API keys: a file with one key per line, checked in constant time.

The key file holds one key per line; blank lines and lines starting with ``#`` are ignored. A line
may name its owner before the key, separated by whitespace (``alice sk-...``), so that logs can say
*who* made a request without ever writing the key itself. Clients send
``Authorization: Bearer KEY`` (what the OpenAI SDKs do).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("inhouse.server")


class KeyFileError(ValueError):
    """The API key file cannot be used (missing, unreadable, empty, or a key too short)."""


MIN_KEY_LENGTH = 8


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys, stored as SHA-256 digests (the plain keys are not kept in memory)."""

    digests: dict[bytes, str]  # sha256(key) -> owner name

    @classmethod
    def from_file(cls, path: str) -> "ApiKeys":
        """Read a key file. Raises `KeyFileError` naming the file and line."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise KeyFileError(f"--api-key-file {path}: {e.strerror}") from None
        digests: dict[bytes, str] = {}
        for i, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) > 2:
                raise KeyFileError(f"--api-key-file {path}, line {i}: expected 'KEY' or 'NAME KEY', got {len(parts)} fields")
            owner, key = (parts[0], parts[1]) if len(parts) == 2 else (f"key{len(digests) + 1}", parts[0])
            if len(key) < MIN_KEY_LENGTH:
                raise KeyFileError(f"--api-key-file {path}, line {i}: the key has {len(key)} characters; "
                                   f"use at least {MIN_KEY_LENGTH}")
            digests[_digest(key)] = owner
        if not digests:
            raise KeyFileError(f"--api-key-file {path}: no keys in the file")
        if os.name == "posix":
            mode = os.stat(path).st_mode
            if mode & 0o077:
                logger.warning("the API key file %s is readable by other users (mode %o); chmod 600 it", path,
                               mode & 0o777)
        return cls(digests)

    def check(self, authorization: Optional[str]) -> Optional[str]:
        """The owner of the key in an ``Authorization`` header value, or None if it is missing or wrong."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        d = _digest(token.strip())
        for known, owner in self.digests.items():
            if hmac.compare_digest(known, d):
                return owner
        return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
