"""Drop-in that makes ``--validator backup-token:FILE`` available."""

from backup_token_validator import BackupTokenValidator, read_tokens

from upgradeproxy.registry import ValidatorPlugin


def _make(argument: str | None) -> BackupTokenValidator:
    if not argument:
        raise ValueError(
            "backup-token needs a token file, for example --validator backup-token:/etc/tokens"
        )
    return BackupTokenValidator(read_tokens(argument))


backup_token = ValidatorPlugin(
    "backup-token",
    "proxmox-backup-protocol-v1 upgrades need an X-Backup-Token listed in FILE (else 401)",
    _make,
    argument="FILE",
)
