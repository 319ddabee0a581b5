"""The words of the README, the docs pages and the notebooks speak of the software.

* No diary: nothing telling how the project was made (sessions, reviewers, issue
  numbers, commit hashes, load averages of particular runs, paths outside the
  repository). Generated pages (docs/study.md, docs/bad_input.md) are their
  generators' business and are left out.
* The README stays a front door: at most 16,000 characters, and every link from it
  into docs/ (or any other repository file) exists.
* Every docs page is in the site's table of contents (docs/index.md), and every page
  the table names exists.

The site itself is built strictly (``sphinx-build -W --keep-going -n``) by
``make docs``, which ``.ci/run`` runs after the tests.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
GENERATED = {DOCS / "study.md", DOCS / "study_vs_lr_proportional.md", DOCS / "study_vs_adpsgd.md", DOCS / "bad_input.md"}
README_LIMIT = 16_000

DIARY = {
    "this session": re.compile(r"\bthis session\b", re.I),
    "session": re.compile(r"\bsessions?\b", re.I),
    "reviewer": re.compile(r"\breviewer", re.I),
    "issue #N": re.compile(r"\bissues?\s*#\s*\d+", re.I),
    "../shared": re.compile(r"\.\./shared"),
    "load average": re.compile(r"\bload average", re.I),
    "saved before": re.compile(r"\bsaved before\b", re.I),
    "commit <hash>": re.compile(r"\bcommit\s+[0-9a-f]{7,40}\b", re.I),
    # a bare commit hash: 7 to 40 hex digits with at least one letter and one digit
    # (so plain decimal numbers and words such as "deadbeef" or "facade" pass)
    "bare hex hash": re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"),
}


def _notebook_text(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(cell.get("source", [])) for cell in cells)


def prose_files() -> list[pathlib.Path]:
    pages = [README, ROOT / "notebooks" / "README.md"]
    pages += sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts and p not in GENERATED)
    pages += sorted((ROOT / "notebooks").glob("*.ipynb"))
    return [p for p in pages if p.exists()]


def _text(path: pathlib.Path) -> str:
    return _notebook_text(path) if path.suffix == ".ipynb" else path.read_text()


@pytest.mark.parametrize("path", prose_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_diary_words(path):
    text = _text(path)
    found = []
    for name, pattern in DIARY.items():
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{path.relative_to(ROOT)}:{line}: {name}: {m.group(0)!r}")
    assert not found, "diary words (say what the software does, not how it was made):\n" + "\n".join(found)


def test_the_diary_patterns_catch_what_they_name():
    caught = lambda s: [n for n, p in DIARY.items() if p.search(s)]  # noqa: E731
    assert "reviewer" in caught("A reviewer ran it")
    assert "issue #N" in caught("before issue #19")
    assert "bare hex hash" in caught("on f1aee65, one after another")
    assert "commit <hash>" in caught("commit f1aee65")
    assert "load average" in caught("at a load average of 9")
    assert "../shared" in caught("`../shared/tools/fresh-ci`")
    assert not caught("4294967296 and 0.1284 ± 0.0036, deadbeef, cafe, 10.213.S.0/24")


def test_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move content to docs/"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_links_exist():
    missing = [target for target in LINK.findall(README.read_text())
               if "://" not in target and not (ROOT / target).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def toctree_entries() -> set[str]:
    entries = set()
    for block in re.findall(r"```\{toctree\}\n(.*?)```", (DOCS / "index.md").read_text(), re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith(":"):
                continue
            m = re.search(r"<([^>]+)>$", line)  # "Title <page>"
            entries.add(m.group(1) if m else line)
    return entries


def test_every_docs_page_is_in_the_toctree_and_every_entry_exists():
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")
             if "_build" not in p.parts and p.name != "index.md"}
    entries = toctree_entries()
    assert pages - entries == set(), f"docs pages missing from docs/index.md's toctree: {sorted(pages - entries)}"
    assert entries - pages == set(), f"toctree entries without a page: {sorted(entries - pages)}"


def test_links_between_docs_pages_exist():
    missing = []
    for page in DOCS.rglob("*.md"):
        if "_build" in page.parts:
            continue
        for target in LINK.findall(page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, "links to missing files:\n" + "\n".join(missing)


def test_every_public_name_has_an_api_entry():
    """docs/api.md documents each public module with automodule (whose members follow
    the module's __all__ or its public names); the package's own names must all be there."""
    import adpsgd_jax

    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"\.\. automodule:: (adpsgd_jax[\w.]*)", api))
    modules = {f"adpsgd_jax.{name}" for name in adpsgd_jax._SUBMODULES}
    assert modules | {"adpsgd_jax"} <= documented
    assert set(adpsgd_jax._EXPORTS) <= set(dir(adpsgd_jax))
    for name, module in adpsgd_jax._EXPORTS.items():  # each re-exported name, documented where it is defined
        assert getattr(adpsgd_jax, name) is getattr(importlib.import_module(f"adpsgd_jax.{module}"), name)


def test_the_cli_names_table_lists_every_method():
    """docs/cli.md's "Method names: CLI and library" has one row per ``METHODS`` entry, each naming the
    library constructor that experiments/methods.py calls for it."""
    from experiments.names import METHODS

    text = (DOCS / "cli.md").read_text()
    table = text[text.index("## Method names: CLI and library"):].split("\n## ")[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.:]+)` \|[^|]*\| (.*) \|$", table, re.M)}
    assert set(METHODS) <= set(rows), set(METHODS) - set(rows)
    methods = (DOCS.parent / "experiments" / "methods.py").read_text()
    for name, call in rows.items():
        if name not in METHODS:  # a schedule of one's own: the user's factory
            continue
        constructors = re.findall(r"(?:schedules|gradient_mean)\.(\w+)\(", call)
        assert constructors, (name, call)
        assert all(re.search(rf"\b{c}\(", methods) for c in constructors), (name, constructors)


def test_getting_started_shows_the_tested_readme_example():
    """docs/getting_started.md repeats the README's library example, which tests/test_readme.py runs."""
    block = re.search(r"<!-- library example: begin -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert block and f"```python\n{block.group(1)}```" in (DOCS / "getting_started.md").read_text()
