"""Workflow files: a session's three steps described in YAML or JSON, for the standalone run.

The schema (every other key is refused, so a typo never passes silently)::

    name: support-triage          # required: a non-empty string
    project: acme                 # optional: the project whose templates --db resolves
    variables:                    # optional: a mapping of names to JSON values
      topic: billing
    templates_dir: templates      # optional: where NAME.j2 files are, relative to this file
    steps:                        # required: 1 to 3 steps, in the order system, planner,
      - role: system              #   synthesis, each role at most once (the shape of a session)
        template: triage/system   # a template name: triage/system.j2 on disk, or the name
      - role: planner             #   resolved custom -> project -> global with --db
        template: triage/planner
      - role: synthesis
        template: triage/synthesis

A file ending in ``.json`` is read as JSON, anything else as YAML. Every problem is one
:class:`WorkflowError` line naming the file and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prompt_tool.core import VariableError, sanitize_variables
from prompt_tool.db.models import PromptRole
from prompt_tool.orchestration.errors import WorkflowError

__all__ = [
    "DEFAULT_TEMPLATES_DIR",
    "TEMPLATE_SUFFIX",
    "Workflow",
    "WorkflowStep",
    "check_template_name",
    "load_workflow",
    "parse_workflow",
]

DEFAULT_TEMPLATES_DIR = "templates"
TEMPLATE_SUFFIX = ".j2"

# The template manager's name rule, minus "." and ".." segments, which would let a name reach
# outside the templates directory on disk.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")
_TOP_KEYS = ("name", "project", "variables", "templates_dir", "steps")
_STEP_KEYS = ("role", "template")
_ROLE_ORDER = {role: index for index, role in enumerate(PromptRole)}
_ROLES = ", ".join(role.value for role in PromptRole)


@dataclass(frozen=True, slots=True)
class WorkflowStep:
    role: PromptRole
    template: str


@dataclass(frozen=True, slots=True)
class Workflow:
    """A validated workflow. ``base_dir`` is the folder of the file (relative paths start there)."""

    name: str
    steps: tuple[WorkflowStep, ...]
    variables: dict[str, Any] = field(default_factory=dict)
    project: str | None = None
    templates_dir: str = DEFAULT_TEMPLATES_DIR
    base_dir: Path = Path()
    path: str | None = None

    @property
    def templates_path(self) -> Path:
        return self.base_dir / self.templates_dir


def check_template_name(name: str) -> str | None:
    """Why ``name`` cannot be a template name, or ``None`` if it can."""
    if not _NAME.match(name):
        return (
            "must start with a letter or digit and use only letters, digits and _ . / - "
            "(at most 200)"
        )
    if any(part in {".", ".."} for part in name.split("/")):
        return "must not contain '.' or '..' path segments"
    return None


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field_name: str, problem: str) -> WorkflowError:
        return WorkflowError(f"invalid workflow {self.where}: field {field_name!r} {problem}")

    def known_keys(self, data: Mapping[Any, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in data:
            if key not in allowed:
                raise self.fail(
                    f"{prefix}{key}", f"is not part of the schema (known: {', '.join(allowed)})"
                )

    def text(
        self, data: Mapping[Any, Any], key: str, prefix: str = "", *, required: bool
    ) -> str | None:
        if key not in data or data[key] is None:
            if required:
                raise self.fail(f"{prefix}{key}", "is required")
            return None
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{prefix}{key}", f"must be a non-empty string, not {value!r}")
        return value


def parse_workflow(
    data: object, *, where: str = "<workflow>", base_dir: Path | None = None
) -> Workflow:
    """Validate already-parsed YAML/JSON data as a workflow."""
    check = _Checker(where)
    if not isinstance(data, Mapping):
        raise WorkflowError(
            f"invalid workflow {where}: the top level must be a mapping with name and steps, "
            f"not {type(data).__name__}"
        )
    check.known_keys(data, _TOP_KEYS, "")
    name = check.text(data, "name", required=True)
    project = check.text(data, "project", required=False)
    templates_dir = check.text(data, "templates_dir", required=False) or DEFAULT_TEMPLATES_DIR

    raw_variables = data.get("variables")
    if raw_variables is None:
        raw_variables = {}
    if not isinstance(raw_variables, Mapping):
        raise check.fail(
            "variables", f"must be a mapping of names to values, not {type(raw_variables).__name__}"
        )
    try:
        variables = sanitize_variables(raw_variables)
    except VariableError as error:
        # YAML turns unquoted dates and times into objects that are not JSON; say so.
        raise check.fail("variables", f"is not JSON data: {error.detail}") from None

    raw_steps = data.get("steps")
    if raw_steps is None:
        raise check.fail("steps", "is required")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise check.fail("steps", "must be a non-empty list of {role, template}")
    steps: list[WorkflowStep] = []
    for index, raw in enumerate(raw_steps):
        prefix = f"steps[{index}]."
        if not isinstance(raw, Mapping):
            raise check.fail(
                f"steps[{index}]", f"must be a mapping with role and template, not {raw!r}"
            )
        check.known_keys(raw, _STEP_KEYS, prefix)
        role_text = check.text(raw, "role", prefix, required=True) or ""
        try:
            role = PromptRole(role_text)
        except ValueError:
            raise check.fail(
                f"{prefix}role", f"must be one of {_ROLES}, not {role_text!r}"
            ) from None
        if steps and _ROLE_ORDER[role] <= _ROLE_ORDER[steps[-1].role]:
            problem = "appears twice" if any(s.role is role for s in steps) else "is out of order"
            raise check.fail(
                f"{prefix}role",
                f"{role.value!r} {problem}; steps run in the order {_ROLES}, each role once "
                "at most",
            )
        template = check.text(raw, "template", prefix, required=True) or ""
        why = check_template_name(template)
        if why is not None:
            raise check.fail(f"{prefix}template", f"{why}, not {template!r}")
        steps.append(WorkflowStep(role, template))

    return Workflow(
        name=name or "",
        steps=tuple(steps),
        variables=variables,
        project=project,
        templates_dir=templates_dir,
        base_dir=base_dir if base_dir is not None else Path(),
        path=where,
    )


def _parse_text(text: str, path: Path) -> object:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise WorkflowError(
                f"invalid workflow {path}: line {error.lineno}: not valid JSON ({error.msg})"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise WorkflowError(f"invalid workflow {path}: {line}not valid YAML ({problem})") from None


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file (``.json``: JSON, else YAML)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"no workflow file at {file}") from None
    except IsADirectoryError:
        raise WorkflowError(f"{file} is a directory; give the workflow file") from None
    except UnicodeDecodeError:
        raise WorkflowError(f"invalid workflow {file}: not UTF-8 text") from None
    return parse_workflow(_parse_text(text, file), where=str(file), base_dir=file.parent)
