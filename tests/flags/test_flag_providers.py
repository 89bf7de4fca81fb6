"""Replacing the database with flagd's JSON flag definitions, read from a local file by the real
``openfeature-provider-flagd`` in-process file mode (no flagd server), configured by environment."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from prompt_tool import flags
from prompt_tool.errors import ConfigurationError
from prompt_tool.flags import DecisionSource, FlagService, ProviderKind, Variant
from prompt_tool.settings import Settings, get_settings

LISTED = ("acme", "globex", "initech")


@pytest.fixture
def flagd_env(example_flagd_file: Path) -> dict[str, str]:
    return {
        "PROMPT_TOOL_FLAG_PROVIDER": "flagd-file",
        "PROMPT_TOOL_FLAGD_FILE": str(example_flagd_file),
    }


@pytest.fixture
def service(db: Engine, settings: Settings) -> Iterator[FlagService]:
    with FlagService(db, settings) as service:
        yield service


def test_flagd_file_targets_listed_projects_and_a_fraction_of_the_rest(
    db: Engine, flagd_env: dict[str, str], service: FlagService
) -> None:
    # The database says otherwise: the configured flagd file wins for every service.
    flags.set_default(db, "legacy", actor="ops")
    flags.set_variant(db, "beta", "templates", actor="ops")

    config = flags.configure_provider_from_env(flagd_env)

    assert config.kind is ProviderKind.FLAGD_FILE
    assert service.provider_name == "FlagdProvider"
    listed = service.variants_for([(slug, None) for slug in LISTED])
    assert {d.variant for d in listed.values()} == {Variant.TEMPLATES}
    assert {d.reason for d in listed.values()} == {DecisionSource.PROVIDER}
    assert listed["acme"].detail == "TARGETING_MATCH"

    rest = [f"project-{n}" for n in range(1000)] + ["beta"]
    decisions = service.variants_for([(slug, n) for n, slug in enumerate(rest)])
    shadow = [slug for slug, d in decisions.items() if d.variant is Variant.SHADOW]
    assert {d.variant for d in decisions.values()} == {Variant.SHADOW, Variant.LEGACY}
    assert 0.18 < len(shadow) / len(rest) < 0.32  # the file asks for 25%
    # Bucketing hashes the slug: the same project always lands in the same place.
    assert service.variants_for([(slug, None) for slug in rest]) == decisions
    # The shadow share's sample rate comes from the flag's metadata in the file.
    assert {decisions[slug].sample_rate for slug in shadow} == {0.1}


def test_get_reports_what_the_configured_provider_answers(
    db: Engine, flagd_env: dict[str, str]
) -> None:
    flags.configure_provider_from_env(flagd_env)

    status = flags.get_variant(db, "acme")

    assert (status.variant, status.source, status.provider) == (
        Variant.TEMPLATES,
        DecisionSource.PROVIDER,
        "FlagdProvider",
    )


def test_a_missing_flagd_file_reads_legacy_instead_of_failing(
    db: Engine, service: FlagService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "nowhere.json"
    flags.configure_provider_from_env(
        {"PROMPT_TOOL_FLAG_PROVIDER": "flagd-file", "PROMPT_TOOL_FLAGD_FILE": str(missing)}
    )

    decision = service.variant_for("acme")

    assert (decision.variant, decision.reason) == (Variant.LEGACY, DecisionSource.PROVIDER_ERROR)
    assert "FLAG_NOT_FOUND" in (decision.detail or "")
    assert any(
        "not ready" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    )


def test_a_flagd_file_with_a_garbage_variant_reads_legacy(
    db: Engine, service: FlagService, tmp_path: Path
) -> None:
    path = tmp_path / "flags.json"
    path.write_text(
        json.dumps(
            {
                "flags": {
                    flags.FLAG_KEY: {
                        "state": "ENABLED",
                        "variants": {"on": "everything-on", "legacy": "legacy"},
                        "defaultVariant": "on",
                    }
                }
            }
        )
    )
    flags.use_provider(flags.flagd_file_provider(path))

    decision = service.variant_for("acme")

    assert (decision.variant, decision.reason) == (Variant.LEGACY, DecisionSource.PROVIDER_ERROR)
    assert decision.detail == "unknown variant 'everything-on'"


def test_the_database_provider_is_the_default_configuration(
    db: Engine, service: FlagService
) -> None:
    flags.set_variant(db, "acme", "templates", actor="ops")

    assert flags.configure_provider_from_env({}).kind is ProviderKind.DATABASE

    assert service.provider_name == "prompt-tool-database"
    assert service.variant_for("acme").reason is DecisionSource.OVERRIDE


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PROMPT_TOOL_FLAG_PROVIDER": "launchdarkly"}, "is not a flag provider"),
        ({"PROMPT_TOOL_FLAG_PROVIDER": "flagd-file"}, "needs PROMPT_TOOL_FLAGD_FILE"),
    ],
)
def test_a_malformed_provider_setting_is_a_configuration_error(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as refused:
        flags.flag_provider_config(env)
    assert refused.value.exit_code == 2


def test_the_provider_settings_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, example_flagd_file: Path
) -> None:
    monkeypatch.setenv("PROMPT_TOOL_FLAG_PROVIDER", "FLAGD-FILE")
    monkeypatch.setenv("PROMPT_TOOL_FLAGD_FILE", str(example_flagd_file))
    get_settings.cache_clear()

    config = flags.flag_provider_config()
    monkeypatch.undo()
    get_settings.cache_clear()

    assert (config.kind, config.flagd_file) == (ProviderKind.FLAGD_FILE, example_flagd_file)
