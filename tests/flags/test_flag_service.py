"""FlagService: the read path. Right answers per project, a short in-process cache, and legacy
(logged once per cause) whenever the provider cannot be trusted."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode, ProviderNotReadyError
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata
from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider
from openfeature.provider.no_op_provider import NoOpProvider
from sqlalchemy import Engine

from prompt_tool import flags
from prompt_tool.errors import ConfigurationError
from prompt_tool.flags import DecisionSource, FlagService, Variant
from prompt_tool.settings import Settings

Answer = Callable[[str, EvaluationContext | None], Any]


class ScriptedProvider(AbstractProvider):
    """An OpenFeature provider whose string answer is whatever ``answer`` does."""

    def __init__(self, answer: Answer, name: str = "scripted") -> None:
        super().__init__()
        self.answer = answer
        self.name = name
        self.calls = 0
        self.inits = 0
        self.shut_down = False

    def get_metadata(self) -> Metadata:
        return Metadata(name=self.name)

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        self.inits += 1

    def shutdown(self) -> None:
        self.shut_down = True

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> Any:
        self.calls += 1
        return self.answer(flag_key, evaluation_context)

    def resolve_boolean_details(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    resolve_integer_details = resolve_float_details = resolve_object_details = (
        resolve_boolean_details
    )


def always(variant: str, **metadata: Any) -> Answer:
    return lambda _key, _ctx: FlagResolutionDetails(
        value=variant, variant=variant, reason=Reason.STATIC, flag_metadata=metadata
    )


@pytest.fixture
def service_for(settings: Settings) -> Iterator[Callable[..., FlagService]]:
    made: list[FlagService] = []

    def make(engine: Engine, **kwargs: Any) -> FlagService:
        kwargs.setdefault("settings", settings)
        service = FlagService(engine, **kwargs)
        made.append(service)
        # The provider is bound on the service's worker; tests start once it is.
        assert service.wait_until_idle(10)
        return service

    yield make
    for service in made:
        service.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "prompt_tool.flags" and r.levelno >= logging.WARNING
    ]


# --- right answers ------------------------------------------------------------------------


def test_two_projects_get_different_variants_in_one_process(
    db: Engine, service_for: Callable[..., FlagService]
) -> None:
    flags.set_variant(db, "acme", "templates", actor="ops")
    flags.set_variant(db, "beta", "shadow", actor="ops", sample_rate=0.25)
    service = service_for(db)

    acme, beta, gamma = (service.variant_for(s) for s in ("acme", "beta", "gamma"))

    assert (acme.variant, acme.reason) == (Variant.TEMPLATES, DecisionSource.OVERRIDE)
    assert (beta.variant, beta.sample_rate) == (Variant.SHADOW, 0.25)
    assert (gamma.variant, gamma.reason) == (Variant.LEGACY, DecisionSource.BUILTIN_DEFAULT)
    assert acme.sample_rate == 0.0 and gamma.sample_rate == 0.0


def test_the_batch_form_answers_every_project_by_slug(
    db: Engine,
    projects_in: Callable[..., dict[str, int]],
    service_for: Callable[..., FlagService],
) -> None:
    ids = {"acme": 0, "beta": 0, "gamma": 0} | projects_in(db, "delta")
    flags.set_default(db, "shadow", actor="ops")
    flags.set_variant(db, "delta", "templates", actor="ops")
    service = service_for(db)

    decisions = service.variants_for([("acme", None), ("delta", ids["delta"]), ("acme", None)])

    assert {slug: d.variant for slug, d in decisions.items()} == {
        "acme": Variant.SHADOW,
        "delta": Variant.TEMPLATES,
    }
    assert decisions["acme"].reason is DecisionSource.DEFAULT
    assert service.variants_for([]) == {}


def test_the_project_id_in_the_context_wins_over_the_slug(
    db: Engine, service_for: Callable[..., FlagService]
) -> None:
    acme_id = flags.set_variant(db, "acme", "templates", actor="ops").project_id
    service = service_for(db)

    # A renamed slug in a stale caller still finds the project by its id.
    assert service.variant_for("acme-renamed", acme_id).variant is Variant.TEMPLATES
    assert service.variant_for("acme-renamed").variant is Variant.LEGACY


def test_two_services_on_two_databases_in_one_process_keep_their_own_state(
    db: Engine,
    other_head_db_url: str,
    engine_for: Any,
    projects_in: Callable[..., dict[str, int]],
    service_for: Callable[..., FlagService],
) -> None:
    other: Engine = engine_for(other_head_db_url)
    projects_in(other, "acme")
    flags.set_variant(db, "acme", "templates", actor="ops")
    flags.set_variant(other, "acme", "shadow", actor="ops")

    first, second = service_for(db), service_for(other)

    assert first.domain != second.domain
    assert first.variant_for("acme").variant is Variant.TEMPLATES
    assert second.variant_for("acme").variant is Variant.SHADOW
    flags.set_variant(other, "acme", "legacy", actor="ops")
    assert first.variant_for("acme").variant is Variant.TEMPLATES
    assert second.variant_for("acme").variant is Variant.LEGACY


def test_kill_switch_forces_legacy(db: Engine, service_for: Callable[..., FlagService]) -> None:
    flags.set_default(db, "templates", actor="ops")
    flags.set_variant(db, "acme", "templates", actor="ops")
    killed = Settings.from_env({"PROMPT_TOOL_TEMPLATES_ENABLED": "0"})
    provider = ScriptedProvider(always("templates"))

    for service in (
        service_for(db, settings=killed),
        service_for(db, settings=killed, provider=provider),
    ):
        decisions = service.variants_for([("acme", None), ("beta", None)])
        assert {d.variant for d in decisions.values()} == {Variant.LEGACY}
        assert {d.reason for d in decisions.values()} == {DecisionSource.KILL_SWITCH}
    assert provider.calls == 0
    status = flags.get_variant(db, "acme", settings=killed)
    assert (status.variant, status.source) == (Variant.LEGACY, DecisionSource.KILL_SWITCH)
    assert flags.list_flags(db, settings=killed).kill_switch


# --- the cache ----------------------------------------------------------------------------


def test_flag_reads_are_cached_and_writes_invalidate(
    db: Engine,
    head_db_url: str,
    clock: Any,
    snapshot_queries: Callable[[Engine], list[str]],
    service_for: Callable[..., FlagService],
) -> None:
    queries = snapshot_queries(db)
    service = service_for(db, clock=clock)
    assert service.wait_until_idle(5)
    assert len(queries) == 1  # warmed when bound

    for _ in range(50):
        assert service.variant_for("acme").variant is Variant.LEGACY
    service.variants_for([("acme", None), ("beta", None), ("gamma", None)])
    assert len(queries) == 1

    # A write through this process (here through another engine on the same database) is seen
    # by the very next read, without waiting for the TTL.
    flags.set_variant(head_db_url, "acme", "templates", actor="ops")
    assert service.variant_for("acme").variant is Variant.TEMPLATES
    assert len(queries) == 2

    clock.advance(4.9)
    service.variant_for("acme")
    assert len(queries) == 2
    clock.advance(0.2)
    service.variant_for("acme")
    service.variant_for("beta")
    assert len(queries) == 3


def test_a_cache_ttl_of_zero_reads_the_table_every_time(
    db: Engine,
    settings: Settings,
    snapshot_queries: Callable[[Engine], list[str]],
    service_for: Callable[..., FlagService],
) -> None:
    service = service_for(db, settings=settings.with_(flag_cache_ttl_s=0.0))
    assert service.wait_until_idle(5)
    queries = snapshot_queries(db)

    for _ in range(3):
        service.variant_for("acme")

    assert len(queries) == 3


def test_a_batch_costs_at_most_one_query(
    db: Engine,
    clock: Any,
    snapshot_queries: Callable[[Engine], list[str]],
    service_for: Callable[..., FlagService],
) -> None:
    service = service_for(db, clock=clock)
    assert service.wait_until_idle(5)
    queries = snapshot_queries(db)
    clock.advance(60)

    service.variants_for([(slug, None) for slug in ("acme", "beta", "gamma")])

    assert len(queries) == 1


# --- failures read legacy, logged once per cause ---------------------------------------------


def test_provider_that_raises_falls_back_to_legacy(
    db: Engine, service_for: Callable[..., FlagService], caplog: pytest.LogCaptureFixture
) -> None:
    def boom(_key: str, _ctx: EvaluationContext | None) -> Any:
        raise RuntimeError("provider exploded")

    service = service_for(db, provider=ScriptedProvider(boom))

    decisions = [service.variant_for(slug) for slug in ("acme", "beta") * 10]

    assert {d.variant for d in decisions} == {Variant.LEGACY}
    assert {d.reason for d in decisions} == {DecisionSource.PROVIDER_ERROR}
    assert "provider exploded" in (decisions[0].detail or "")
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "provider exploded" in warnings[0]
    assert service.fallback_counts() == {"provider_error:GENERAL:RuntimeError": 20}


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        (always("TEMPLATES"), "unknown variant 'TEMPLATES'"),
        (always("on"), "unknown variant 'on'"),
        (always(3), "TYPE_MISMATCH"),  # type: ignore[arg-type]
        (lambda _k, _c: None, "not FlagResolutionDetails"),
        (lambda _k, _c: "templates", "not FlagResolutionDetails"),
        (
            lambda _k, _c: FlagResolutionDetails(
                value="templates", error_code=ErrorCode.PARSE_ERROR, error_message="bad json"
            ),
            "PARSE_ERROR: bad json",
        ),
    ],
    ids=["wrong-case", "unknown-string", "not-a-string", "none", "bare-string", "error-code"],
)
def test_provider_returning_garbage_falls_back_to_legacy(
    db: Engine,
    service_for: Callable[..., FlagService],
    caplog: pytest.LogCaptureFixture,
    answer: Answer,
    shown: str,
) -> None:
    service = service_for(db, provider=ScriptedProvider(answer))

    decisions = list(service.variants_for([("acme", None), ("beta", None)]).values())
    decisions.append(service.variant_for("gamma"))

    assert {d.variant for d in decisions} == {Variant.LEGACY}
    assert {d.reason for d in decisions} == {DecisionSource.PROVIDER_ERROR}
    assert shown in (decisions[0].detail or "")
    assert len(_warnings(caplog)) == 1


def test_a_garbage_sample_rate_is_ignored_not_trusted(
    db: Engine, service_for: Callable[..., FlagService], caplog: pytest.LogCaptureFixture
) -> None:
    service = service_for(db, provider=ScriptedProvider(always("shadow", shadow_sample_rate=7)))

    decision = service.variant_for("acme")

    assert (decision.variant, decision.sample_rate) == (Variant.SHADOW, 1.0)
    assert len(_warnings(caplog)) == 1


def test_slow_provider_times_out_to_legacy(
    db: Engine, service_for: Callable[..., FlagService], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    hanging = threading.Event()

    def hang_then_answer(_key: str, _ctx: EvaluationContext | None) -> Any:
        if not release.is_set():
            hanging.set()
            release.wait()
        return FlagResolutionDetails(value="templates", variant="templates")

    provider = ScriptedProvider(hang_then_answer)
    service = service_for(db, provider=provider, evaluation_timeout_s=0.1)

    first = service.variant_for("acme")
    assert hanging.wait(5)
    assert (first.variant, first.reason) == (Variant.LEGACY, DecisionSource.PROVIDER_ERROR)
    assert "no answer within 0.1s" in (first.detail or "")

    # While the provider is stuck, reads answer at once instead of queueing behind it.
    later = [service.variant_for(slug) for slug in ("beta", "gamma", "acme")]
    assert {d.variant for d in later} == {Variant.LEGACY}
    assert {d.detail for d in later} == {"provider still busy with an earlier call that timed out"}
    assert provider.calls == 1

    release.set()
    assert service.wait_until_idle(5)
    assert service.variant_for("acme").variant is Variant.TEMPLATES
    assert len(_warnings(caplog)) == 1
    assert service.fallback_counts() == {"timeout": 4}


def test_a_provider_that_fails_to_start_reads_legacy_and_says_why(
    db: Engine, service_for: Callable[..., FlagService], caplog: pytest.LogCaptureFixture
) -> None:
    def not_ready(_key: str, _ctx: EvaluationContext | None) -> Any:
        raise ProviderNotReadyError("no flags loaded")

    class WontStart(ScriptedProvider):
        def initialize(self, evaluation_context: EvaluationContext) -> None:
            raise ConnectionError("no flag server")

    service = service_for(db, provider=WontStart(not_ready))

    decision = service.variant_for("acme")
    assert (decision.variant, decision.reason) == (Variant.LEGACY, DecisionSource.PROVIDER_ERROR)
    assert "PROVIDER_NOT_READY" in (decision.detail or "")
    warnings = _warnings(caplog)
    assert len(warnings) == 2 and "no flag server" in warnings[0]


def test_an_unreadable_flag_table_reads_legacy_and_is_queried_once_per_ttl(
    empty_db_url: str,
    engine_for: Any,
    clock: Any,
    snapshot_queries: Callable[[Engine], list[str]],
    service_for: Callable[..., FlagService],
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken: Engine = engine_for(empty_db_url)  # no tables at all
    queries = snapshot_queries(broken)
    service = service_for(broken, clock=clock)

    decisions = [service.variant_for("acme") for _ in range(20)]

    assert {d.variant for d in decisions} == {Variant.LEGACY}
    assert {d.reason for d in decisions} == {DecisionSource.PROVIDER_ERROR}
    assert "cannot read the flag table" in (decisions[0].detail or "")
    assert len(queries) == 1
    clock.advance(10)
    service.variant_for("acme")
    assert len(queries) == 2
    assert len(_warnings(caplog)) == 1


def test_reads_in_the_callers_thread_never_raise_either(
    db: Engine, service_for: Callable[..., FlagService]
) -> None:
    def boom(_key: str, _ctx: EvaluationContext | None) -> Any:
        raise ValueError("nope")

    inline = service_for(db, provider=ScriptedProvider(boom), evaluation_timeout_s=None)
    assert inline.variant_for("acme").reason is DecisionSource.PROVIDER_ERROR

    flags.set_variant(db, "acme", "templates", actor="ops")
    database = service_for(db, evaluation_timeout_s=None)
    assert database.variant_for("acme").variant is Variant.TEMPLATES


def test_a_closed_service_reads_legacy_and_shuts_its_provider_down(
    db: Engine, service_for: Callable[..., FlagService]
) -> None:
    provider = ScriptedProvider(always("templates"))
    service = service_for(db, provider=provider)
    assert service.variant_for("acme").variant is Variant.TEMPLATES

    service.close()
    service.close()

    assert service.variant_for("acme").variant is Variant.LEGACY
    assert isinstance(api.get_client(service.domain).provider, NoOpProvider)


# --- replacing the provider ----------------------------------------------------------------


def test_use_provider_replaces_the_database_for_services_without_their_own(
    db: Engine, service_for: Callable[..., FlagService]
) -> None:
    flags.set_variant(db, "acme", "legacy", actor="ops")
    service = service_for(db)
    pinned = service_for(db, provider=ScriptedProvider(always("shadow")))
    assert service.variant_for("acme").variant is Variant.LEGACY

    flags.use_provider(
        InMemoryProvider(
            {
                flags.FLAG_KEY: InMemoryFlag(
                    "templates",
                    {"legacy": "legacy", "templates": "templates"},
                )
            }
        )
    )

    replaced = service.variant_for("acme")
    assert (replaced.variant, replaced.reason) == (Variant.TEMPLATES, DecisionSource.PROVIDER)
    assert service.provider_name == "In-Memory Provider"
    assert pinned.variant_for("acme").variant is Variant.SHADOW

    flags.reset_provider()
    assert service.variant_for("acme").reason is DecisionSource.OVERRIDE


def test_prompt_tool_never_touches_the_applications_own_global_provider(
    db: Engine, service_for: Callable[..., FlagService]
) -> None:
    own = InMemoryProvider({"checkout": InMemoryFlag("on", {"on": True, "off": False})})
    api.set_provider_and_wait(own)
    try:
        service = service_for(db)
        service.variant_for("acme")
        flags.use_provider(ScriptedProvider(always("templates")))
        flags.reset_provider()

        assert api.get_client().provider is own
        assert api.get_client().get_boolean_value("checkout", False)
        assert service.domain.startswith(f"{flags.DOMAIN}/")
    finally:
        api.set_provider(NoOpProvider())


def test_closed_services_give_their_domain_back_so_the_registry_stays_small(
    db: Engine, settings: Settings
) -> None:
    domains = set()
    for _ in range(20):
        with FlagService(db, settings) as service:
            service.variant_for("acme")
            domains.add(service.domain)

    assert len(domains) == 1


def test_using_the_same_provider_twice_keeps_it_running(db: Engine) -> None:
    provider = ScriptedProvider(always("templates"))

    flags.use_provider(provider)
    flags.use_provider(provider)

    with FlagService(db) as service:
        assert service.variant_for("acme").variant is Variant.TEMPLATES
    assert provider.inits == 1


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_a_timeout_that_is_not_positive_is_a_configuration_error(
    db: Engine, timeout: float
) -> None:
    with pytest.raises(ConfigurationError, match="positive number of seconds"):
        FlagService(db, evaluation_timeout_s=timeout)
