"""A griffe extension for the API pages: docstring examples (``>>>`` lines and their output)
are shown as Python code blocks instead of being read as Markdown, and Sphinx roles
(``:class:`~dataorder.ghost.GhostGrads```) as inline code (``GhostGrads``)."""

from __future__ import annotations

import re
from typing import Any

import griffe

# :class:`x`, :py:func:`~a.b`, ... -- the roles the docstrings use for cross references
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def _role_as_code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    if short or target.startswith("."):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def plain_roles(text: str) -> str:
    """Turn Sphinx cross-reference roles into inline code; ``~`` (and a leading ``.``) keep
    the last name only, as Sphinx shows them.

    >>> plain_roles("See :class:`~dataorder.ghost.GhostGrads` and :func:`dataorder.shard`.")
    'See `GhostGrads` and `dataorder.shard`.'
    >>> plain_roles(":param sketch: the width")
    ':param sketch: the width'
    """
    return SPHINX_ROLE.sub(_role_as_code, text)


def fence_doctests(text: str) -> str:
    """Wrap each run of ``>>>``/``...`` lines and their output in a fenced ``pycon`` block.

    >>> fence_doctests("Text.\\n\\n>>> 1 + 1\\n2\\n\\nMore.").splitlines()
    ['Text.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
    """
    out: list[str] = []
    in_example = in_fence = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if not in_fence and not in_example and stripped.startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            in_example = True
        elif in_example and not stripped:
            out.append(f"{indent}```")
            in_example = False
        out.append(line)
    if in_example:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the examples of every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(plain_roles(obj.docstring.value))
