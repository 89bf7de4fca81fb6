"""Model clients: the one interface both orchestrators call, and how a client is chosen.

Only an offline, deterministic client ships (``echo``). Real model clients plug in without
touching this package: register a factory under a name (:func:`register_client`), or name one
by import path, ``package.module:attribute``, where the attribute is a client instance, a class
or a factory callable taking no arguments.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from prompt_tool.orchestration.errors import ModelClientError
from prompt_tool.orchestration.types import StepRequest, StepResult

__all__ = [
    "DEFAULT_CLIENT",
    "ClientFactory",
    "EchoClient",
    "ModelClient",
    "available_clients",
    "load_client",
    "register_client",
    "resolve_client",
]

DEFAULT_CLIENT = "echo"

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@runtime_checkable
class ModelClient(Protocol):
    """Completes one step. Raise any exception to fail the step; its message is recorded."""

    def complete(self, step: StepRequest) -> StepResult: ...


ClientFactory = Callable[[], ModelClient]


class EchoClient:
    """Answers every step with its own input: offline, free and the same on every run.

    A dry run with it shows exactly what a real model would be sent, and each step's output
    shows how the earlier outputs were folded into the next input.
    """

    model = "echo"

    def complete(self, step: StepRequest) -> StepResult:
        return StepResult(text=step.input_text, model=self.model)


_registry: dict[str, ClientFactory] = {DEFAULT_CLIENT: EchoClient}
_registry_lock = threading.Lock()


def register_client(name: str, factory: ClientFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``--client NAME``."""
    if not name or ":" in name:
        raise ModelClientError(f"client name {name!r} must be non-empty and contain no ':'")
    with _registry_lock:
        if name in _registry and not replace:
            raise ModelClientError(
                f"a model client named {name!r} is already registered; pass replace=True"
            )
        _registry[name] = factory


def available_clients() -> list[str]:
    with _registry_lock:
        return sorted(_registry)


def _from_import_path(spec: str) -> object:
    module_name, _, attribute = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelClientError(
            f"model client {spec!r}: cannot import {module_name!r} ({error}); "
            "check the module path and that it is installed"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ModelClientError(
                f"model client {spec!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    return target


def load_client(spec: str | None = None) -> ModelClient:
    """The client named ``spec``: a registered name (default ``echo``) or ``module:attribute``."""
    spec = spec or DEFAULT_CLIENT
    if _IMPORT_PATH.match(spec):
        target = _from_import_path(spec)
    else:
        with _registry_lock:
            factory = _registry.get(spec)
        if factory is None:
            names = ", ".join(available_clients())
            raise ModelClientError(
                f"unknown model client {spec!r}; use one of {names}, or an import path "
                "package.module:attribute"
            )
        target = factory
    # A class or factory is called to get the client; an instance is used as it is. A class
    # passes the protocol's isinstance check (it has the method), so it is tested first.
    if isinstance(target, type) or (callable(target) and not isinstance(target, ModelClient)):
        try:
            target = target()
        except TypeError as error:
            raise ModelClientError(
                f"model client {spec!r} could not be built without arguments ({error}); "
                "point at an instance or a factory that takes none"
            ) from None
    if not isinstance(target, ModelClient):
        raise ModelClientError(
            f"model client {spec!r} is a {type(target).__name__}, which has no "
            "complete(step) method"
        )
    return target


def resolve_client(client: ModelClient | str | None) -> tuple[ModelClient, str]:
    """A client given as an object, a name or an import path, and the name to report it by."""
    if client is None or isinstance(client, str):
        spec = client or DEFAULT_CLIENT
        return load_client(spec), spec
    return client, type(client).__name__
