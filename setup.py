"""Build script: the optional compiled core ``livemap_core._core``.

* ``LIVEMAP_NO_EXTENSIONS=1``: build nothing; a pure-Python install.
* ``LIVEMAP_REQUIRE_EXTENSIONS=1``: the extension must build; a failure is an error.
* otherwise: try to build it; with no compiler (or no Cython) the install goes on
  without it and ``livemap_core`` uses its pure-Python twin.
* ``LIVEMAP_CYTHON_TRACE=1``: line tracing for coverage builds (never for releases).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = bool(os.environ.get("LIVEMAP_NO_EXTENSIONS"))
REQUIRE_EXTENSIONS = bool(os.environ.get("LIVEMAP_REQUIRE_EXTENSIONS"))
TRACE = bool(os.environ.get("LIVEMAP_CYTHON_TRACE"))

if sys.implementation.name != "cpython":
    NO_EXTENSIONS = True


class OptionalBuildExt(build_ext):
    """A build_ext whose failure leaves a working pure-Python install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            self._give_up(exc)

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        if REQUIRE_EXTENSIONS:
            raise exc
        print(
            f"livemap: building the compiled core failed ({exc!r}); "
            "installing the pure-Python core instead",
            file=sys.stderr,
        )


def extensions() -> list:  # type: ignore[type-arg]
    if NO_EXTENSIONS:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE_EXTENSIONS:
            raise
        return []
    from setuptools import Extension

    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if TRACE else []
    ext = Extension("livemap_core._core", ["livemap_core/_core.pyx"], define_macros=macros)
    directives = {
        "language_level": "3",
        "embedsignature": True,
        "boundscheck": False,
        "wraparound": False,
        "initializedcheck": False,
        "linetrace": TRACE,
    }
    return cythonize([ext], compiler_directives=directives, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
