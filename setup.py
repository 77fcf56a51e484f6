"""Build script: the optional compiled core ``livemap_core._core``, and the
long description for PyPI.

* ``LIVEMAP_NO_EXTENSIONS=1``: build nothing; a pure-Python install.
* ``LIVEMAP_REQUIRE_EXTENSIONS=1``: the extension must build; any failure
  (no Cython, no compiler, a Cython or C error) is an error.  Setting both is
  an error too.
* otherwise: try to build it; if that fails the install goes on without it
  and ``livemap_core`` uses its pure-Python twin (``IMPLEMENTATION`` says so).
* ``LIVEMAP_CYTHON_TRACE=1``: line tracing, for coverage builds only.

A build without the compiled core, asked for or fallen back to, is a pure
wheel, tagged ``py3-none-any``: it must never pass for a platform build of
this Python.  It says so once, as a warning that pip shows at install time.

Cython runs inside ``build_ext`` (not when this file is loaded), so building
an sdist or reading metadata never generates C files, and a Cython failure is
handled like a compiler failure.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from setuptools import Distribution, Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.command.editable_wheel import editable_wheel

if sys.version_info >= (3, 11):
    import tomllib
else:  # a build requirement on 3.10 (pyproject.toml)
    import tomli as tomllib

HERE = Path(__file__).resolve().parent

NOT_CPYTHON = sys.implementation.name != "cpython"
NO_EXTENSIONS = bool(os.environ.get("LIVEMAP_NO_EXTENSIONS")) or NOT_CPYTHON
REQUIRE_EXTENSIONS = bool(os.environ.get("LIVEMAP_REQUIRE_EXTENSIONS"))
TRACE = bool(os.environ.get("LIVEMAP_CYTHON_TRACE"))

if REQUIRE_EXTENSIONS and NO_EXTENSIONS:
    raise SystemExit(
        "livemap: LIVEMAP_REQUIRE_EXTENSIONS is set, but "
        + (
            f"{sys.implementation.name} cannot build the compiled core"
            if NOT_CPYTHON
            else "so is LIVEMAP_NO_EXTENSIONS: unset one of them"
        )
    )

DIRECTIVES = {
    "language_level": "3",
    "embedsignature": True,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "linetrace": TRACE,
}


class PureBuildWarning(UserWarning):
    """This build has no compiled core (pip shows a build backend's warnings)."""


# Why the compiled core is not in this build (None: it is, or nothing was built).
_pure_reason: str | None = None


FALLBACK_ADVICE = (
    "To get the compiled core, install a C compiler and the Python headers, then "
    "reinstall without pip's cached wheel (pip install --no-cache-dir "
    "--force-reinstall livemap); LIVEMAP_REQUIRE_EXTENSIONS=1 makes a failed "
    "build an error."
)


def _announce_pure(reason: str, advice: str = FALLBACK_ADVICE) -> None:
    """Record that the build is pure and say why, once per build."""
    global _pure_reason
    if _pure_reason is not None:
        return
    _pure_reason = reason
    message = (
        f"livemap: the compiled core (livemap_core._core) is not built: {reason}. "
        "This is a pure-Python build (a py3-none-any wheel): livemap works the "
        "same on its pure-Python core, only slower (livemap_core.IMPLEMENTATION "
        f'is "python"). {advice}'
    ).rstrip()
    # pip shows a build backend's warnings when it builds a directory (a
    # clone), but an sdist's only with -vv, while it shows the build's output
    # with -v; build and cibuildwheel show both.  So: a warning in a clone, a
    # line on stderr in an unpacked sdist (the one that has PKG-INFO at its root).
    if (HERE / "PKG-INFO").is_file():
        print(message, file=sys.stderr, flush=True)
    else:
        warnings.warn(message, PureBuildWarning, stacklevel=3)


def _why(exc: BaseException) -> str:
    """A short account of ``exc``: a failed compiler command by its program."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    failed = re.match(r"Command '\['([^']+)'.*\]' (returned .*?)\.?$", text)
    if failed:
        text = f"{failed.group(1)} {failed.group(2)}"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


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
                self._give_up(f"Cython failed ({_why(exc)})", exc)
        super().finalize_options()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self._give_up(f"the build failed ({_why(exc)})", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._give_up(f"compiling it failed ({_why(exc)})", exc)

    def _give_up(self, reason: str, exc: Exception) -> None:
        if REQUIRE_EXTENSIONS:
            raise exc
        # Nothing is left to build, install or copy in place: the wheel is pure.
        self.extensions = []
        self.distribution.ext_modules = []
        _announce_pure(reason)


def _announce_if_pure(dist: Distribution) -> None:
    """Say so when the build was pure from the start (asked for, or not CPython)."""
    if dist.has_ext_modules():
        return
    if NOT_CPYTHON:
        _announce_pure(f"{sys.implementation.name} has no use for it", "")
    else:
        _announce_pure("LIVEMAP_NO_EXTENSIONS is set", "Unset it to build the compiled core.")


class BdistWheel(bdist_wheel):
    """A wheel without the compiled core is tagged ``py3-none-any``.

    ``bdist_wheel`` decides purity before building (from the extension
    modules that are configured); a build that fell back changes that answer,
    so it is asked again once ``build`` has run, before the wheel's install
    layout, tag and ``WHEEL`` file are made.
    """

    def run(self) -> None:
        _announce_if_pure(self.distribution)
        super().run()

    def run_command(self, command: str) -> None:
        super().run_command(command)
        if command == "build" and not self.distribution.has_ext_modules():
            self.root_is_pure = True


class EditableWheel(editable_wheel):
    """``pip install -e .``: says so too when it is pure from the start."""

    def run(self) -> None:
        _announce_if_pure(self.distribution)
        super().run()


# -- long description ----------------------------------------------------------

# An inline Markdown link or image target: ](target) or ](target "title").
_LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")


def _absolute_links(text: str, repository: str, ref: str) -> str:
    """README.md with its relative links pointing into the repository at
    ``ref``, so that they work where the README is shown outside GitHub."""

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target, re.IGNORECASE):
            return match.group(0)  # a URL, an anchor, or rooted: leave it
        path, sep, anchor = target.partition("#")
        kind = "tree" if path.endswith("/") else "blob"  # GitHub redirects either way
        url = f"{repository}/{kind}/{ref}/{path.removeprefix('./')}{sep}{anchor}"
        return f"{match.group(1)}{url}{match.group(3)}"

    return _LINK.sub(fix, text)


def long_description() -> str:
    project = tomllib.loads((HERE / "pyproject.toml").read_text(encoding="utf-8"))
    repository = project["project"]["urls"]["Source"].rstrip("/")
    version_file = (HERE / "livemap" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__ = \"([^\"]+)\"", version_file, re.MULTILINE)
    if match is None:
        raise SystemExit("livemap: no __version__ in livemap/_version.py")
    version = match.group(1)
    # a release links to its own tag; anything else to the main branch
    ref = "main" if re.search(r"dev|\+", version) else f"v{version}"
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    return _absolute_links(readme, repository, ref)


def extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        return []
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if TRACE else []
    return [Extension("livemap_core._core", ["livemap_core/_core.pyx"], define_macros=macros)]


setup(
    long_description=long_description(),
    long_description_content_type="text/markdown",
    ext_modules=extensions(),
    cmdclass={
        "build_ext": OptionalBuildExt,
        "bdist_wheel": BdistWheel,
        "editable_wheel": EditableWheel,
    },
)
