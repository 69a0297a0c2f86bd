"""A validator that lets a backup protocol through only with a known token.

A backup server behind upgradeproxy speaks ``proxmox-backup-protocol-v1``
after the switch. This validator refuses that upgrade with ``401`` unless the
request carries an ``X-Backup-Token`` header whose value is one of the tokens
in a file (one per line), so unknown clients never reach the backup server.
Other upgrades pass untouched.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from zope.interface import implementer

from upgradeproxy import IUpgradeValidator, Refusal, UpgradeAttempt

PROTOCOL = b"proxmox-backup-protocol-v1"
HEADER = b"x-backup-token"


def read_tokens(path: str) -> list[bytes]:
    """The tokens in ``path``, one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the token file {path!r}: {e.strerror}") from None
    tokens = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith(b"#")
    ]
    if not tokens:
        raise ValueError(f"the token file {path!r} holds no tokens")
    return tokens


@implementer(IUpgradeValidator)
class BackupTokenValidator:
    """Backup upgrades need an ``X-Backup-Token`` that is one of ``tokens``."""

    name = "backup-token"

    def __init__(self, tokens: list[bytes]) -> None:
        self.tokens = tokens

    def check_request(self, attempt: UpgradeAttempt) -> Refusal | None:
        if PROTOCOL not in (p.lower() for p in attempt.offered):
            return None
        given = attempt.request.headers.get_all(HEADER)
        if len(given) == 1 and any(hmac.compare_digest(given[0], t) for t in self.tokens):
            return None
        return Refusal("a backup upgrade needs a valid X-Backup-Token header", 401)

    def check_response(self, attempt: UpgradeAttempt) -> Refusal | None:
        return None
