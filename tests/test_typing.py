"""Typing: the public signatures as a user's ``mypy --strict`` sees them, and
what ``help()`` and ``inspect.signature`` show of the declarers.

``tests/typing/good_*.py`` must type-check cleanly; each
``tests/typing/bad_*.py`` holds one mistake, on the line marked
``# E: <text>``, where mypy must report an error whose code (``arg-type``) is
``<text>`` or whose message contains it.  One mypy run checks them all.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import pathlib
import pydoc
import re
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from types import ModuleType

import pytest
from _cores import core_fixture  # noqa: F401  (the ``core`` fixture)

import livemap
from livemap import KeyedTarget, LiveMap
from livemap._runtime import _tables

SNIPPETS = pathlib.Path(__file__).resolve().parent / "typing"
GOOD = sorted(SNIPPETS.glob("good_*.py"))
BAD = sorted(SNIPPETS.glob("bad_*.py"))
MYPY_TIMEOUT = 600.0

_MARK = re.compile(r"#\s*E:\s*(?P<text>.+?)\s*$")
_REPORT = re.compile(
    r"^(?P<file>[^:]+\.py):(?P<line>\d+): (?P<severity>error|note): (?P<message>.*?)"
    r"(?:  \[(?P<code>[a-z0-9-]+)\])?$"
)


@dataclass(frozen=True)
class Reported:
    line: int
    message: str
    code: str | None

    def matches(self, text: str) -> bool:
        return text == self.code or text in self.message


def _dev_extra_installed() -> bool:
    """Whether the ``dev`` extra's other tools are here (then mypy should be too)."""
    try:
        importlib.metadata.version("ruff")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _mypy_path() -> str | None:
    """The folder to put on mypy's search path for the livemap under test:
    the source tree of an editable install (which mypy cannot find through
    the import hook), nothing for an installed one."""
    root = pathlib.Path(livemap.__file__).resolve().parent.parent
    installed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    installed.update(site.getsitepackages())
    if any(root == pathlib.Path(p).resolve() for p in installed):
        return None
    return str(root)


@pytest.fixture(scope="module")
def mypy_report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Reported]]:
    """The errors mypy reports over every snippet, by file name."""
    if importlib.util.find_spec("mypy") is None:
        reason = "mypy is not installed (it comes with the dev extra: pip install -e '.[dev]')"
        if os.environ.get("CI") and _dev_extra_installed():
            pytest.fail(f"{reason}, but the dev extra's other tools are, under CI", pytrace=False)
        pytest.skip(reason)
    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("mypy") if cache is not None else tmp_path_factory.mktemp("mypy")
    env = dict(os.environ)
    extra = _mypy_path()
    if extra is not None:
        env["MYPYPATH"] = os.pathsep.join(p for p in (extra, env.get("MYPYPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        "mypy.ini",
        "--cache-dir",
        str(cache_dir),
        "--no-pretty",
        "--no-color-output",
        "--no-error-summary",
        "--show-error-codes",
        *(p.name for p in GOOD + BAD),
    ]
    proc = subprocess.run(
        cmd,
        cwd=SNIPPETS,
        env=env,
        capture_output=True,
        text=True,
        timeout=MYPY_TIMEOUT,
        check=False,
    )
    output = proc.stdout + proc.stderr
    # 0: no errors, 1: errors reported; anything else is mypy failing to run
    assert proc.returncode in (0, 1), f"mypy failed to run ({proc.returncode}):\n{output}"
    known = {p.name for p in GOOD + BAD}
    report: dict[str, list[Reported]] = {name: [] for name in known}
    for line in proc.stdout.splitlines():
        found = _REPORT.match(line)
        assert found is not None, f"unexpected mypy output line {line!r}:\n{output}"
        if found["severity"] == "note":
            continue
        name = found["file"]
        assert name in known, f"mypy reported an error outside the snippets:\n{output}"
        report[name].append(Reported(int(found["line"]), found["message"], found["code"]))
    return report


def test_there_are_snippets() -> None:
    assert GOOD and BAD


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_snippet_type_checks(
    path: pathlib.Path, mypy_report: dict[str, list[Reported]]
) -> None:
    errors = mypy_report[path.name]
    assert not errors, "\n".join(f"{path.name}:{e.line}: {e.message} [{e.code}]" for e in errors)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_snippet_fails_on_its_marked_line(
    path: pathlib.Path, mypy_report: dict[str, list[Reported]]
) -> None:
    marks = [
        (number, found["text"])
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if (found := _MARK.search(text)) is not None
    ]
    assert len(marks) == 1, f"{path.name} must mark exactly one line with '# E: <text>'"
    ((line, expected),) = marks
    errors = mypy_report[path.name]
    shown = "\n".join(f"  {e.line}: {e.message} [{e.code}]" for e in errors) or "  (none)"
    assert errors, f"{path.name}:{line}: mypy reported no error, expected {expected!r}"
    assert all(e.line == line for e in errors), (
        f"{path.name}: errors away from the marked line {line}:\n{shown}"
    )
    assert any(e.matches(expected) for e in errors), (
        f"{path.name}:{line}: expected {expected!r}, mypy reported:\n{shown}"
    )


# -- the declarers, as help() and inspect see them -------------------------------


def _declarers(core: ModuleType) -> tuple[object, object]:
    """``lm.declare_entry`` and ``target.declare``, made with ``core``."""
    made: list[object] = []

    async def main() -> None:
        lm: LiveMap[str, int] = await LiveMap.create()
        made.append(lm.declare_entry)

    _tables.use_core(core)
    try:
        livemap.App("declarers", main).update_blocking()
        target: KeyedTarget[str, int] = KeyedTarget("t", lambda batch: None)
        made.append(target.declare)
    finally:
        _tables.use_core(None)
    return made[0], made[1]


@pytest.mark.parametrize(
    ("which", "name", "raises"),
    [
        (0, "declare_entry", ("NotInComponentError", "MapRetiredError", "TypeError")),
        (1, "declare", ("NotInComponentError", "TypeError")),
    ],
    ids=["declare_entry", "declare"],
)
def test_declarer_documents_itself(
    core: ModuleType, which: int, name: str, raises: tuple[str, ...]
) -> None:
    declarer = _declarers(core)[which]
    assert isinstance(declarer, core.Declarer)  # the core's fast callable itself
    assert str(inspect.signature(declarer)) == "(key, value) -> None"
    doc = inspect.getdoc(declarer)
    assert doc is not None
    assert doc.startswith("Declare ``key -> value`` as owned by the current component run.")
    for error in ("DuplicateDeclarationError", *raises):
        assert error in doc, error
    text = pydoc.render_doc(declarer, title="Help on %s:", renderer=pydoc.plaintext)
    assert f"\n{name}(key, value) -> None\n" in text
    assert "Declare ``key -> value``" in text
    # none of the core's internals
    for internal in ("closed_error", "ContextVar", "Data descriptors", "Methods inherited"):
        assert internal not in text, internal
    assert name in repr(declarer)
    if core.__name__.endswith("._core"):
        # the compiled core's declarer takes a call without an argument tuple
        # (the vectorcall protocol), its documented subclass too
        assert type(declarer).__flags__ & _HAVE_VECTORCALL


_HAVE_VECTORCALL = 1 << 11  # Py_TPFLAGS_HAVE_VECTORCALL


def test_declarer_slots_are_documented() -> None:
    # the slots' docs (what help(LiveMap) shows for the attribute)
    assert "DuplicateDeclarationError" in (inspect.getdoc(LiveMap.declare_entry) or "")
    assert "DuplicateDeclarationError" in (inspect.getdoc(KeyedTarget.declare) or "")
    assert "declare_entry(key, value)" in pydoc.render_doc(LiveMap, renderer=pydoc.plaintext)
