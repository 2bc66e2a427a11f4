"""API-key authentication, checked in constant time.

Keys come from a file (one per line, ``#`` comments allowed) and/or the
``api_keys`` config field (set through ``PDSERVE_ROUTER_API_KEYS``, never a
flag, so keys stay out of process listings). A presented key is compared with
every configured key by ``hmac.compare_digest`` over SHA-256 digests: the time
taken depends neither on how much of a key matched nor on which key it was.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from common.errors import ConfigError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys if k]

    @classmethod
    def load(cls, *, file: str | None, keys: Iterable[str] = ()) -> ApiKeys:
        all_keys = [k.strip() for k in keys if k.strip()]
        if file:
            try:
                lines = Path(file).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"cannot read API key file: {e}", field="api_keys_file") from e
            all_keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(all_keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True for ``Bearer <a configured key>`` (always true when no keys are configured)."""
        if not self._digests:
            return True
        presented = b""
        if authorization and authorization[:7].lower() == "bearer ":
            presented = _digest(authorization[7:].strip())
        ok = False
        for digest in self._digests:  # no early exit
            ok |= hmac.compare_digest(digest, presented)
        return ok
