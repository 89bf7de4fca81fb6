"""The migration toolkit behind `orch-migrate`: fingerprints, sample data, and (as it lands)
export, backfill, verify, restore, status and rehearse."""

from prompt_tool.migrate.fingerprint import (
    LegacyFingerprint,
    TableFingerprint,
    changed_tables,
    fingerprint_legacy_tables,
    load_fingerprint,
)
from prompt_tool.migrate.sample import LoadedSample, load_legacy_sample

__all__ = [
    "LegacyFingerprint",
    "LoadedSample",
    "TableFingerprint",
    "changed_tables",
    "fingerprint_legacy_tables",
    "load_fingerprint",
    "load_legacy_sample",
]
