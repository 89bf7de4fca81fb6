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

__all__ = ["literal_template"]

# A run of "{" that would open a tag: greedy, so "{{{x" escapes the first two braces and leaves
# the last one (followed by "x") as plain text.
_OPENING_BRACES: Final = re.compile(r"\{+(?=[{%#])")


def literal_template(text: str) -> str:
    """Jinja source that renders to ``text`` byte for byte (identity when nothing to escape)."""
    if "{" not in text:
        return text
    return _OPENING_BRACES.sub(lambda match: "{{'" + match.group(0) + "'}}", text)
