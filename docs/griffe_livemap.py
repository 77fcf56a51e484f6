"""griffe extensions for the API reference (mkdocs.yml loads them).

``PureCore``: ``livemap_core``'s names point at the pure-Python core.
``livemap_core/__init__.py`` imports the same names from the compiled core or
from the pure-Python one, whichever is in use; a static reading sees the
compiled branch last, and griffe would then document the Cython classes by
importing the built extension (or fail where it is not built).  The pure core
is the reference implementation and carries the annotated signatures, so the
site documents that one, whether or not the compiled core is built.

``SphinxRoles``: the docstrings are written for Sphinx-style tools
(``:class:`Commit```); the site renders them as Markdown, where such a role
becomes a plain code span (```Commit```).
"""

from __future__ import annotations

import ast
import re
from typing import Any

from griffe import Alias, Extension, Module, Object, ObjectNode

COMPILED = "livemap_core._core."
PURE = "livemap_core._fallback."

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|data|attr|mod|exc|obj|const):`~?([^`]+)`")


class PureCore(Extension):
    def on_module_members(self, *, mod: Module, **kwargs: Any) -> None:
        if mod.path != "livemap_core":
            return
        for name, member in list(mod.members.items()):
            if not isinstance(member, Alias) or not member.target_path.startswith(COMPILED):
                continue
            mod.set_member(
                name,
                Alias(
                    name,
                    PURE + member.target_path.removeprefix(COMPILED),
                    lineno=member.alias_lineno,
                    endlineno=member.alias_endlineno,
                    parent=mod,
                ),
            )


class SphinxRoles(Extension):
    def on_instance(self, *, node: ast.AST | ObjectNode, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
