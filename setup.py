"""Build script: the optional compiled core ``livemap_core._core``.

* ``LIVEMAP_NO_EXTENSIONS=1``: build nothing; a pure-Python install.
* ``LIVEMAP_REQUIRE_EXTENSIONS=1``: the extension must build; any failure
  (no Cython, no compiler, a Cython or C error) is an error.
* otherwise: try to build it; if that fails the install goes on without it
  and ``livemap_core`` uses its pure-Python twin (``IMPLEMENTATION`` says so).
* ``LIVEMAP_CYTHON_TRACE=1``: line tracing, for coverage builds only.

Cython runs inside ``build_ext`` (not when this file is loaded), so building
an sdist or reading metadata never generates C files, and a Cython failure is
handled like a compiler failure.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = bool(os.environ.get("LIVEMAP_NO_EXTENSIONS")) or (
    sys.implementation.name != "cpython"
)
REQUIRE_EXTENSIONS = bool(os.environ.get("LIVEMAP_REQUIRE_EXTENSIONS"))
TRACE = bool(os.environ.get("LIVEMAP_CYTHON_TRACE"))

DIRECTIVES = {
    "language_level": "3",
    "embedsignature": True,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "linetrace": TRACE,
}


class OptionalBuildExt(build_ext):
    """Cythonize and compile; on failure, fall back to the pure core unless
    the compiled one is required."""

    def finalize_options(self) -> None:
        ext_modules = self.distribution.ext_modules
        if ext_modules:
            try:
                from Cython.Build import cythonize

                self.distribution.ext_modules = cythonize(
                    ext_modules, compiler_directives=DIRECTIVES, quiet=True
                )
            except Exception as exc:
                self._give_up(exc)
                self.distribution.ext_modules = []
        super().finalize_options()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self._give_up(exc)

    def build_extension(self, ext: Extension) -> None:
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


def extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        return []
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if TRACE else []
    return [Extension("livemap_core._core", ["livemap_core/_core.pyx"], define_macros=macros)]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
