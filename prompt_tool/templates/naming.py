"""What a valid template name, label and address look like; InvalidInputError otherwise."""

from __future__ import annotations

import re

from prompt_tool.db.models import Scope
from prompt_tool.errors import InvalidInputError
from prompt_tool.templates.types import TemplateAddress

__all__ = ["check_address", "check_label", "check_name"]

_LABEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,49}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")


def check_name(name: str) -> None:
    if not _NAME_PATTERN.match(name):
        raise InvalidInputError(
            f"template name {name!r} must start with a letter or digit and use only letters, "
            "digits and _ . / - (at most 200)"
        )


def check_label(label: str) -> None:
    if not _LABEL_PATTERN.match(label):
        raise InvalidInputError(
            f"label {label!r} must be lowercase letters, digits, _ . - (at most 50)"
        )


def check_address(address: TemplateAddress) -> None:
    check_name(address.name)
    if address.scope is Scope.GLOBAL and (address.project or address.owner):
        raise InvalidInputError("a global template has no --project and no owner")
    if address.scope is Scope.PROJECT and (not address.project or address.owner):
        raise InvalidInputError("a project template needs --project (and has no owner)")
    if address.scope is Scope.CUSTOM and not (address.project and address.owner):
        raise InvalidInputError("a custom template needs --project and its owner (--as USER)")
