"""Choosing a model client: echo by default, a registered name, or an import path. No DB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_tool.orchestration import (
    EchoClient,
    ModelClientError,
    StepRequest,
    available_clients,
    load_client,
    register_client,
    resolve_client,
)
from prompt_tool.orchestration import clients as clients_module

PLUGIN = """
from prompt_tool.orchestration import StepRequest, StepResult

class Shouty:
    def complete(self, step: StepRequest) -> StepResult:
        return StepResult(step.input_text.upper(), model="shouty-2")

INSTANCE = Shouty()

def make():
    return Shouty()

NOT_A_CLIENT = 42
"""


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "shouty_llm.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "shouty_llm"


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(clients_module._registry)
    yield
    clients_module._registry.clear()
    clients_module._registry.update(saved)


def _request(text: str) -> StepRequest:
    return StepRequest(position=2, role="planner", prompt=text, input_text=text)


def test_echo_is_the_default_client_and_answers_with_its_exact_input() -> None:
    client, name = resolve_client(None)
    assert isinstance(client, EchoClient) and name == "echo"
    result = client.complete(_request("Plan {{ this }}\r\n"))
    assert (result.text, result.model) == ("Plan {{ this }}\r\n", "echo")


@pytest.mark.parametrize("attribute", ["Shouty", "INSTANCE", "make"])
def test_a_client_named_by_import_path_may_be_a_class_an_instance_or_a_factory(
    plugin_module: str, attribute: str
) -> None:
    client = load_client(f"{plugin_module}:{attribute}")
    assert client.complete(_request("hi")).text == "HI"


def test_an_import_path_to_something_that_is_not_a_client_is_refused(plugin_module: str) -> None:
    with pytest.raises(ModelClientError, match="has no complete"):
        load_client(f"{plugin_module}:NOT_A_CLIENT")
    with pytest.raises(ModelClientError, match="has no attribute 'Missing'"):
        load_client(f"{plugin_module}:Missing")
    with pytest.raises(ModelClientError, match="cannot import 'no_such_module_here'"):
        load_client("no_such_module_here:Client")


def test_a_registered_client_is_found_by_name(plugin_module: str, clean_registry: None) -> None:
    factory = load_client(f"{plugin_module}:make")
    register_client("shouty", lambda: factory)
    assert "shouty" in available_clients()
    assert load_client("shouty") is factory
    with pytest.raises(ModelClientError, match="already registered"):
        register_client("shouty", EchoClient)


def test_an_unknown_client_name_is_bad_input_listing_the_known_ones() -> None:
    with pytest.raises(
        ModelClientError, match="unknown model client 'gpt-9'; use one of echo"
    ) as caught:
        load_client("gpt-9")
    assert caught.value.exit_code == 2
