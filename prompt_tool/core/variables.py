"""Declared template variables and the checks every render applies to the values passed in.

Only JSON values reach a template: the sandbox then only ever sees ``str``, ``int``,
``float``, ``bool``, ``None``, ``list``/``tuple`` and ``dict`` with ``str`` keys, whose
attributes it allow-lists. Anything else (a datetime, an ORM object, a function) is refused
up front, naming the variable and the path inside it.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeAlias, cast, get_args

from prompt_tool.core.errors import VariableError, VariableSpecError
from prompt_tool.errors import InvalidInputError

__all__ = [
    "JSONValue",
    "VariableSpec",
    "VariableType",
    "check_text_value",
    "parse_variable_specs",
    "prepare_variables",
    "read_json_file",
    "read_variables_file",
    "sanitize_variables",
]

JSONValue: TypeAlias = (
    "str | int | float | bool | list[JSONValue] | tuple[JSONValue, ...] | dict[str, JSONValue] "
    "| None"
)
VariableType = Literal["string", "number", "integer", "boolean", "list", "object", "any"]
VARIABLE_TYPES: Final[frozenset[str]] = frozenset(get_args(VariableType))

# Self-referencing containers would recurse forever; real prompt data is never this deep.
MAX_DEPTH: Final = 100

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Names Jinja gives a meaning of its own: a variable with one of these names could be passed
# but never read back as a plain variable inside the template.
_RESERVED_NAMES: Final = frozenset(
    {"true", "false", "none", "True", "False", "None", "loop", "self", "super", "caller",
     "varargs", "kwargs", "range"}
)  # fmt: skip
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_STR_ONLY: Final = frozenset({str})
_SPEC_KEYS: Final = frozenset({"name", "type", "required", "default"})


_Problem: TypeAlias = "tuple[list[str | int], object, Literal['type', 'key', 'depth']]"


def _find_non_json(value: object, depth: int = 0) -> _Problem | None:
    """The first non-JSON thing inside ``value``: (path reversed, offender, why), or ``None``."""
    kind = type(value)
    if kind in _SCALARS:
        return None
    if depth >= MAX_DEPTH:
        return [], value, "depth"
    if kind is list or kind is tuple:
        if set(map(type, cast("list[object]", value))) <= _SCALARS:
            return None  # flat list of scalars: settled by one C-level scan
        for index, item in enumerate(cast("list[object]", value)):
            if type(item) in _SCALARS:
                continue
            found = _find_non_json(item, depth + 1)
            if found is not None:
                found[0].append(index)
                return found
        return None
    if kind is dict:
        for key, item in cast("dict[object, object]", value).items():
            if type(key) is not str:
                return [], key, "key"
            if type(item) in _SCALARS:
                continue
            found = _find_non_json(item, depth + 1)
            if found is not None:
                found[0].append(key)
                return found
        return None
    return [], value, "type"


def _format_path(name: str, reversed_path: list[str | int]) -> str:
    text = name
    for part in reversed(reversed_path):
        if isinstance(part, int):
            text += f"[{part}]"
        elif _NAME_RE.match(part):
            text += f".{part}"
        else:
            text += f"[{part!r}]"
    return text


def _json_problem(name: str, value: object) -> str | None:
    found = _find_non_json(value)
    if found is None:
        return None
    path, bad, why = found
    where = _format_path(name, path)
    if why == "depth":
        return f"{where} is nested deeper than {MAX_DEPTH} levels (does it contain itself?)"
    if why == "key":
        return f"{where} has a key of type {type(bad).__name__!r}; object keys must be strings"
    return f"{where} is a {type(bad).__name__!r}; only JSON values can be passed"


def sanitize_variables(variables: Mapping[str, object] | None) -> dict[str, object]:
    """Check that every value is JSON (recursively) and return a fresh top-level dict."""
    if variables is None:
        return {}
    if type(variables) is not dict and not isinstance(variables, Mapping):
        raise VariableError(
            f"variables must be a mapping of names to JSON values, got {type(variables).__name__}"
        )
    result = dict(variables)
    # The common case, a handful of strings and numbers, is settled by two C-level scans.
    if result and not set(map(type, result)) <= _STR_ONLY:
        bad = next(name for name in result if type(name) is not str)
        raise VariableError(f"variable names must be strings, got {bad!r}")
    if not set(map(type, result.values())) <= _SCALARS:
        for name, value in result.items():
            kind = type(value)
            if kind in _SCALARS or (
                kind is list and set(map(type, cast(list[object], value))) <= _SCALARS
            ):
                continue  # a flat list of scalars, the usual non-scalar, also in C
            problem = _json_problem(name, value)
            if problem is not None:
                raise VariableError(f"variable {problem}")
    return result


@dataclass(frozen=True, slots=True)
class VariableSpec:
    """One declared variable of a template: its name, JSON type, and whether it must be given.

    ``default`` is used when an optional variable is not passed; ``None`` means "no default"
    (the variable is then simply undefined in the template, test it with ``is defined``).
    """

    name: str
    type: VariableType = "any"
    required: bool = True
    default: JSONValue = None

    def __post_init__(self) -> None:
        if type(self.name) is not str or not _NAME_RE.match(self.name):
            raise VariableSpecError(
                f"variable name {self.name!r} is not a valid identifier",
                hint="use letters, digits and underscores, not starting with a digit",
            )
        if keyword.iskeyword(self.name) or self.name in _RESERVED_NAMES:
            raise VariableSpecError(
                f"variable name {self.name!r} is reserved by the template language",
                hint="choose another name",
            )
        if self.type not in VARIABLE_TYPES:
            raise VariableSpecError(
                f"variable {self.name!r} has unknown type {self.type!r}",
                hint=f"use one of {', '.join(sorted(VARIABLE_TYPES))}",
            )
        if type(self.required) is not bool:
            raise VariableSpecError(
                f"variable {self.name!r}: 'required' must be true or false, got {self.required!r}"
            )
        if self.default is not None:
            if self.required:
                raise VariableSpecError(
                    f"variable {self.name!r} is required and also has a default",
                    hint="set required to false to use the default, or drop the default",
                )
            problem = _json_problem(self.name, self.default)
            if problem is not None:
                raise VariableSpecError(f"the default of {problem}")
            if not self.accepts(self.default):
                raise VariableSpecError(
                    f"the default of variable {self.name!r} is a "
                    f"{_json_type_name(self.default)}, not a {self.type}",
                    hint="make the default match the declared type",
                )

    def accepts(self, value: object) -> bool:
        """Whether ``value`` (already known to be JSON) has this variable's declared type."""
        return _TYPE_CHECKS[self.type](value)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> VariableSpec:
        """Parse one declaration such as ``{"name": "user", "type": "string"}``."""
        if not isinstance(data, Mapping):
            raise VariableSpecError(
                f"a variable declaration must be an object, got {type(data).__name__}"
            )
        unknown = set(data) - _SPEC_KEYS
        if unknown:
            raise VariableSpecError(
                f"variable declaration {data.get('name')!r} has unknown keys "
                f"{', '.join(sorted(map(str, unknown)))}",
                hint=f"use only {', '.join(sorted(_SPEC_KEYS))}",
            )
        if "name" not in data:
            raise VariableSpecError("a variable declaration has no 'name'")
        return cls(
            name=cast(str, data["name"]),
            type=cast(VariableType, data.get("type", "any")),
            required=cast(bool, data.get("required", True)),
            default=cast(JSONValue, data.get("default")),
        )

    def to_dict(self) -> dict[str, JSONValue]:
        """The JSON form :meth:`from_dict` reads back."""
        data: dict[str, JSONValue] = {
            "name": self.name,
            "type": self.type,
            "required": self.required,
        }
        if self.default is not None:
            data["default"] = self.default
        return data


def _json_type_name(value: object) -> str:
    kind = type(value)
    if kind is bool:
        return "boolean"
    if kind is int:
        return "integer"
    if kind is float:
        return "number"
    if kind is str:
        return "string"
    if kind is list or kind is tuple:
        return "list"
    if kind is dict:
        return "object"
    if value is None:
        return "null"
    return kind.__name__


_TYPE_CHECKS: Final[dict[str, Callable[[object], bool]]] = {
    "string": lambda v: type(v) is str,
    "number": lambda v: type(v) is int or type(v) is float,
    "integer": lambda v: type(v) is int,
    "boolean": lambda v: type(v) is bool,
    "list": lambda v: type(v) is list or type(v) is tuple,
    "object": lambda v: type(v) is dict,
    "any": lambda v: True,
}


DeclaredVariables: TypeAlias = (
    "Iterable[VariableSpec | Mapping[str, object]] | Mapping[str, Mapping[str, object]]"
)


def parse_variable_specs(data: DeclaredVariables | None) -> tuple[VariableSpec, ...]:
    """Normalise declarations to a tuple of :class:`VariableSpec`.

    Accepts a list of specs or of JSON objects (``[{"name": "user", ...}]``), or an object
    keyed by name (``{"user": {"type": "string"}}``). Names must be unique.
    """
    if data is None:
        return ()
    if isinstance(data, tuple) and all(type(item) is VariableSpec for item in data):
        specs = cast("tuple[VariableSpec, ...]", data)
    elif isinstance(data, Mapping):
        specs = tuple(_spec_from_named(name, body) for name, body in data.items())
    elif isinstance(data, str | bytes) or not isinstance(data, Iterable):
        raise VariableSpecError(
            f"variable declarations must be a list or an object, got {type(data).__name__}"
        )
    else:
        specs = tuple(
            item if type(item) is VariableSpec else VariableSpec.from_dict(item)  # type: ignore[arg-type]
            for item in data
        )
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise VariableSpecError(
                f"variable {spec.name!r} is declared twice", hint="declare each variable once"
            )
        seen.add(spec.name)
    return specs


def _spec_from_named(name: object, body: object) -> VariableSpec:
    if not isinstance(body, Mapping):
        raise VariableSpecError(
            f"the declaration of variable {name!r} must be an object, got {type(body).__name__}"
        )
    if "name" in body and body["name"] != name:
        raise VariableSpecError(
            f"variable declared under {name!r} names itself {body['name']!r}",
            hint="drop the inner 'name' or make it match",
        )
    return VariableSpec.from_dict({**body, "name": name})


def prepare_variables(
    variables: Mapping[str, object] | None, specs: tuple[VariableSpec, ...] | None
) -> dict[str, object]:
    """Sanitise ``variables`` and, when the template declares its variables, check them.

    Unknown names, missing required variables and wrong types are refused; defaults of
    optional variables that were not passed are filled in. ``None`` is accepted for an
    optional variable whatever its type (JSON ``null`` meaning "not set").
    """
    values = sanitize_variables(variables)
    if specs is None:
        return values
    known = {spec.name for spec in specs}
    unknown = sorted(values.keys() - known)
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise VariableError(
            f"unknown variable{'s' if len(unknown) > 1 else ''} {names}; "
            f"the template declares {', '.join(sorted(known)) or 'no variables'}",
            hint="remove it or declare it in the template's variables",
        )
    missing: list[str] = []
    for spec in specs:
        if spec.name in values:
            value = values[spec.name]
            if not spec.accepts(value) and not (value is None and not spec.required):
                raise VariableError(
                    f"variable {spec.name!r} must be a {spec.type}, got a {_json_type_name(value)}",
                    hint=f"pass a {spec.type} for {spec.name!r}",
                )
        elif spec.default is not None:
            values[spec.name] = spec.default
        elif spec.required:
            missing.append(spec.name)
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise VariableError(
            f"missing required variable{'s' if len(missing) > 1 else ''} {names}",
            hint="pass every required variable",
        )
    return values


# --- variables from files and the command line -----------------------------------------------


def _surrogate_in(text: str) -> str | None:
    """The first lone surrogate in ``text`` (which no encoding can write), or ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return text[error.start]
    return None


def _surrogate_problem(name: str, value: object) -> str | None:
    """Where the first lone surrogate inside ``value`` is (a string or key), or ``None``.

    Walked with a stack, not recursion: ``value`` may be as deep as JSON parsing allows.
    """
    stack: list[tuple[object, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if type(item) is str:
            bad = _surrogate_in(item)
            if bad is not None:
                where = _format_path(name, path)
                return f"{where} holds a lone surrogate (U+{ord(bad):04X}), which is not text"
        elif type(item) is list or type(item) is tuple:
            stack.extend((child, [index, *path]) for index, child in enumerate(item))
        elif type(item) is dict:
            for key, child in item.items():
                if type(key) is str and _surrogate_in(key) is not None:
                    where = _format_path(name, path)
                    return f"{where} has a key holding a lone surrogate, which is not text"
                stack.append((child, [key, *path]))
    return None


def check_text_value(name: str, value: object) -> None:
    """Refuse a variable holding a lone surrogate (``"\\ud800"`` in JSON, or undecodable bytes
    on the command line): it could never be printed or stored as text."""
    problem = _surrogate_problem(name, value)
    if problem is not None:
        raise VariableError(
            f"variable {problem}",
            hint="pass valid Unicode text: no lone \\ud800-\\udfff escapes in JSON, no bytes that "
            "are not UTF-8",
        )


def read_json_file(path: Path, *, max_bytes: int, what: str) -> object:
    """The JSON in ``path``, refused in one line (:class:`InvalidInputError`) if it is missing,
    larger than ``max_bytes`` (checked before reading it, and while reading a pipe), not UTF-8,
    not JSON, or nested deeper than the parser can follow."""
    try:
        with path.open("rb") as file:
            size = _size_of(file.fileno())
            if size is not None and size > max_bytes:
                raise _too_big(path, what, max_bytes, size)
            raw = file.read(max_bytes + 1)
    except FileNotFoundError:
        raise InvalidInputError(f"no {what} at {path}") from None
    except IsADirectoryError:
        raise InvalidInputError(
            f"{path} is a directory; give the path of {what} (a JSON file)"
        ) from None
    if len(raw) > max_bytes:
        raise _too_big(path, what, max_bytes, None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"{path} is not UTF-8 text (byte {error.start}); save the {what} as UTF-8 JSON"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidInputError(
            f"{path} is nested too deeply to read; {what} may be nested at most {MAX_DEPTH} levels"
        ) from None
    except ValueError as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error}") from None


def _size_of(descriptor: int) -> int | None:
    info = os.fstat(descriptor)
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _too_big(path: Path, what: str, max_bytes: int, size: int | None) -> InvalidInputError:
    actual = f" ({size:,} bytes)" if size is not None else ""
    return InvalidInputError(
        f"{path} is larger than the {max_bytes:,} bytes allowed for {what}{actual}; pass less, "
        "or raise PROMPT_TOOL_VARS_FILE_MAX_BYTES"
    )


def read_variables_file(path: Path, *, max_bytes: int) -> dict[str, object]:
    """The variables in a JSON object file (``--vars-file``), every problem one line: see
    :func:`read_json_file`; also refused: anything but an object, values nested deeper than
    :data:`MAX_DEPTH`, and text holding lone surrogates."""
    loaded = read_json_file(path, max_bytes=max_bytes, what="a variables file")
    if not isinstance(loaded, dict):
        raise InvalidInputError(f"{path} must hold a JSON object of variables")
    variables = cast("dict[str, object]", loaded)
    for name, value in variables.items():
        check_text_value(name, value)
        problem = _json_problem(name, value)
        if problem is not None:
            raise VariableError(f"variable {problem} in {path}", hint="pass flatter JSON values")
    return variables
