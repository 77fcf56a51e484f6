"""Release hygiene that needs no build: the API reference names every public
name, the repository URL is the same everywhere, ``python -m livemap``.

The files checked here are in the clone and in the sdist (which cibuildwheel
tests from); a test whose file is absent skips.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

import livemap
import livemap.errors
import livemap_core
from livemap import __main__ as livemap_main

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
PUBLIC_MODULES = {"livemap", "livemap.errors", "livemap_core"}


def read(relative: str) -> str:
    path = ROOT / relative
    if not path.is_file():
        pytest.skip(f"{relative} is not here (not a clone or an sdist)")
    return path.read_text(encoding="utf-8")


def load_toml(relative: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(read(relative))


def reference_identifiers() -> list[str]:
    """The objects ``docs/reference.md`` renders (``::: dotted.path`` lines)."""
    return re.findall(r"^:::[ \t]+(\S+)[ \t]*$", read("docs/reference.md"), re.MULTILINE)


def public_names() -> set[str]:
    """Every public name, at the path the reference documents it under."""
    errors = set(livemap.errors.__all__)
    names = {f"livemap.errors.{name}" for name in errors}
    names |= {f"livemap.{name}" for name in livemap.__all__ if name not in errors}
    names |= {f"livemap_core.{name}" for name in livemap_core.__all__}
    return names


def test_errors_are_public_in_livemap_too() -> None:
    assert set(livemap.errors.__all__) <= set(livemap.__all__)


def test_reference_documents_every_public_name() -> None:
    documented = set(reference_identifiers())
    missing = sorted(public_names() - documented)
    assert not missing, f"docs/reference.md has no '::: name' for {missing}"


def test_reference_documents_public_names_only_through_public_modules() -> None:
    identifiers = reference_identifiers()
    assert len(identifiers) == len(set(identifiers)), "a name is rendered twice"
    allowed = public_names() | PUBLIC_MODULES
    stray = sorted(set(identifiers) - allowed)
    assert not stray, f"docs/reference.md renders names that are not public: {stray}"


def test_python_m_livemap_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        livemap_main.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"livemap {livemap.__version__}\n"


def test_python_m_livemap_points_at_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert livemap_main.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"livemap {livemap.__version__}:")
    assert "python -m livemap.examples.entities" in out
    expected = "compiled" if livemap_core.IMPLEMENTATION == "cython" else "pure Python"
    assert f"core:   {expected}" in out


def test_version_is_pep440() -> None:
    # X.Y.Z, optionally with a pre-release, .postN or .devN suffix
    pattern = r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?"
    assert re.fullmatch(pattern, livemap.__version__), livemap.__version__


# -- the repository URL --------------------------------------------------------


def repository() -> str:
    url: str = load_toml("pyproject.toml")["project"]["urls"]["Source"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    return url


def test_project_urls_are_under_the_repository() -> None:
    base = repository()
    urls = load_toml("pyproject.toml")["project"]["urls"]
    assert {"Source", "Issues", "Documentation", "Changelog"} <= set(urls)
    for label, url in urls.items():
        assert url == base or url.startswith(base + "/"), (label, url)


LINKING_FILES = [
    "README.md",
    "CHANGELOG.md",
    "mkdocs.yml",
    "pyproject.toml",
    "setup.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
]


@pytest.mark.parametrize("relative", LINKING_FILES)
def test_links_to_the_repository_use_one_url(relative: str) -> None:
    base = repository()
    text = read(relative)
    for match in re.finditer(r"https?://github\.com/([\w.-]+)/([\w.-]+)", text):
        owner, name = match.group(1), match.group(2).removesuffix(".git")
        if "livemap" in owner.lower() or name.lower() == "livemap":
            assert f"https://github.com/{owner}/{name}" == base, (relative, match.group(0))


def test_docs_site_points_at_the_repository() -> None:
    base = repository()
    text = read("mkdocs.yml")
    assert re.search(rf"^repo_url: {re.escape(base)}$", text, re.MULTILINE)


def test_changelog_versions_are_dated_and_linked() -> None:
    text = read("CHANGELOG.md")
    base = repository()
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, re.MULTILINE)
    assert headings and headings[0][0] == "Unreleased"
    links = dict(re.findall(r"^\[([^\]]+)\]: (\S+)$", text, re.MULTILINE))
    for version, rest in headings:
        assert version in links, f"no link for [{version}] at the bottom"
        assert links[version].startswith(f"{base}/"), links[version]
        if version != "Unreleased":
            assert re.fullmatch(r" - \d{4}-\d{2}-\d{2}", rest), f"[{version}] has no date"


# -- what the tests need -------------------------------------------------------


def test_pytest_config_needs_no_benchmark_plugin() -> None:
    # python -m pytest must run with only the [test] extra installed
    config = load_toml("pyproject.toml")
    extras = config["project"]["optional-dependencies"]
    assert not any("benchmark" in req for req in extras["test"])
    assert any("pytest-benchmark" in req for req in extras["bench"])
    options = config["tool"]["pytest"]["ini_options"]
    assert not any("benchmark" in str(opt) for opt in options.get("addopts", []))
