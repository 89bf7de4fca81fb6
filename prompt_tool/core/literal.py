"""Turn arbitrary plain text into template source that renders back to exactly that text.

Used to store legacy prompt texts as templates. Only three two-character sequences mean
anything to the lexer in this environment (no line statements, no line comments): ``{{``,
``{%`` and ``{#``. Each starts with ``{``, so escaping every ``{`` that is followed by ``{``,
``%`` or ``#`` is enough: such a run of braces is emitted as a string literal expression,
``{{'{{'}}``. This needs no ``{% raw %}`` block (which could not contain ``{% endraw %}``),
keeps every other byte, CRLF and unicode included, exactly where it was, and leaves text with
no delimiters untouched.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["literal_template", "literal_text"]

# A run of "{" that would open a tag: greedy, so "{{{x" escapes the first two braces and leaves
# the last one (followed by "x") as plain text.
_OPENING_BRACES: Final = re.compile(r"\{+(?=[{%#])")
# What literal_template makes of such a run.
_ESCAPED_BRACES: Final = re.compile(r"\{\{'(\{+)'\}\}")


def literal_template(text: str) -> str:
    """Jinja source that renders to ``text`` byte for byte (identity when nothing to escape)."""
    if "{" not in text:
        return text
    return _OPENING_BRACES.sub(lambda match: "{{'" + match.group(0) + "'}}", text)


def literal_text(source: str) -> str | None:
    """The text ``source`` renders to when it is what :func:`literal_template` makes of some
    text (whatever the variables: it refers to none), else None.

    Lets a reader serve such a template without rendering it: unescape, then check that
    escaping gives ``source`` back, so only an exact image of ``literal_template`` qualifies.
    """
    text = _ESCAPED_BRACES.sub(lambda match: match.group(1), source) if "{" in source else source
    return text if literal_template(text) == source else None
