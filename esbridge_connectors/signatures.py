"""HMAC signatures of pushed requests: verify on intake, produce on send (tests, senders).

Why a timestamp: an HMAC over the body alone proves who sent it but not when,
so a captured request could be replayed forever. When ``timestamp_header`` is
set, the signed content is ``b"<timestamp>." + body`` (the scheme Stripe and
Slack use) and requests older or newer than ``tolerance`` seconds are refused.
Inside the tolerance a replay is just a redelivery, which the intake's
delivery-id deduplication absorbs.

Several secrets may be configured at once so a secret can be rotated without
refusing requests signed with the old one; the header may carry several
signatures separated by commas or spaces (any one valid signature passes).
All comparisons use :func:`hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from esbridge.errors import ConfigurationError, EsbridgeError

UNIX_SECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
"""A timestamp as senders write it: ASCII digits, optionally a decimal fraction.

Stricter than ``float()``, which also takes ``nan`` (every comparison with it is
false, so a NaN timestamp would pass any freshness check), ``inf``, exponents,
signs, underscores, surrounding spaces and non-ASCII digits.
"""


class SignatureError(EsbridgeError):
    """A pushed request's signature or timestamp is missing, invalid or stale.

    ``reason`` is a short text safe to return to the sender (it never contains
    the secret or the expected signature).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _as_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


@dataclass(frozen=True)
class HmacSignature:
    """How a sender signs requests: header names, secret(s), digest, encoding.

    ``prefix`` is a literal text before each signature in the header (GitHub
    sends ``sha256=<hex>``). ``encoding`` is ``"hex"`` or ``"base64"``.
    Timestamps are Unix seconds (ASCII digits, optionally with a decimal fraction;
    anything else, such as ``nan``, ``inf`` or ``1e9``, is refused).
    """

    secrets: Sequence[str | bytes]
    header: str = "X-Signature"
    algorithm: str = "sha256"
    prefix: str = ""
    encoding: Literal["hex", "base64"] = "hex"
    timestamp_header: str | None = "X-Timestamp"
    tolerance: float = 300.0
    _keys: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.secrets, str | bytes):
            raise ConfigurationError(
                "HmacSignature(secrets=...) takes a list of secrets, e.g. secrets=[secret]"
            )
        keys = tuple(_as_bytes(s) for s in self.secrets)
        if not keys or not all(keys):
            raise ConfigurationError("HmacSignature needs at least one non-empty secret")
        if self.algorithm not in hashlib.algorithms_guaranteed:
            raise ConfigurationError(
                f"unknown HMAC algorithm {self.algorithm!r}; use one of "
                f"{sorted(hashlib.algorithms_guaranteed)}"
            )
        if self.encoding not in ("hex", "base64"):
            raise ConfigurationError(
                f"signature encoding must be 'hex' or 'base64', not {self.encoding!r}"
            )
        object.__setattr__(self, "_keys", keys)

    def signed_content(self, body: bytes, timestamp: str | None) -> bytes:
        """The bytes the HMAC covers: the body, preceded by ``"<timestamp>."`` if timestamped."""
        if self.timestamp_header is None:
            return body
        return f"{timestamp}.".encode() + body

    def _digest(self, key: bytes, content: bytes) -> str:
        mac = hmac.new(key, content, self.algorithm).digest()
        if self.encoding == "hex":
            return mac.hex()
        return base64.b64encode(mac).decode()

    def sign(self, body: bytes, timestamp: float | None = None) -> dict[str, str]:
        """Headers a sender adds to a request with ``body`` (signed with the first secret)."""
        headers: dict[str, str] = {}
        stamp: str | None = None
        if self.timestamp_header is not None:
            stamp = str(int(time.time() if timestamp is None else timestamp))
            headers[self.timestamp_header] = stamp
        digest = self._digest(self._keys[0], self.signed_content(body, stamp))
        headers[self.header] = self.prefix + digest
        return headers

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
        """Return if the request is authentic and fresh, else raise :class:`SignatureError`.

        ``headers`` must look names up case-insensitively (Starlette's and
        httpx's header mappings do).
        """
        stamp: str | None = None
        if self.timestamp_header is not None:
            stamp = headers.get(self.timestamp_header)
            if not stamp:
                raise SignatureError(f"missing timestamp header {self.timestamp_header}")
            if not UNIX_SECONDS.fullmatch(stamp):
                raise SignatureError(
                    f"timestamp header {self.timestamp_header} is not Unix seconds"
                )
            sent_at = float(stamp)
            skew = (time.time() if now is None else now) - sent_at
            if abs(skew) > self.tolerance:
                raise SignatureError(
                    f"stale timestamp: {skew:.0f} s from the server clock "
                    f"(tolerance {self.tolerance:.0f} s)"
                )
        value = headers.get(self.header)
        if not value:
            raise SignatureError(f"missing signature header {self.header}")
        offered = [
            part[len(self.prefix) :]
            for part in value.replace(",", " ").split()
            if part.startswith(self.prefix)
        ]
        content = self.signed_content(body, stamp)
        expected = [self._digest(key, content) for key in self._keys]
        # Compare every pair (no early exit) so timing does not reveal which part matched.
        matched = False
        for candidate in offered:
            for digest in expected:
                matched |= hmac.compare_digest(candidate.encode(), digest.encode())
        if not matched:
            raise SignatureError(f"invalid signature in header {self.header}")
