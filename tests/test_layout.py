"""Checks of the tree itself, which anyone can run: short functions in
adpsgd_jax/ and experiments/, each shared name defined once, and no reference to a Markdown
file that the repository does not have."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("adpsgd_jax", "experiments")
MAX_LINES = 80
# Names shared by the CLI, the library, the benchmarks and the report: one definition each.
SHARED = ("DATASETS", "MODELS", "STRATEGIES", "METHODS", "SCHEDULES", "LR_SCHEDULES", "DTYPES", "OUTER_OPTIMIZERS",
          "OUTER_DEFAULTS", "MAX_QSGD_LEVELS", "BANDWIDTHS", "BANDWIDTHS_GBPS", "GBPS", "CPU_DEVICES",
          "DEFAULT_COMPARE")


def sources(*packages):
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def test_no_function_in_the_packages_is_longer_than_80_lines_unless_it_says_why():
    long = []
    for path in sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                why = "lines because" in (ast.get_docstring(node) or "")
                if lines > MAX_LINES and not why:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_each_shared_name_is_defined_once():
    where = {}
    for path in sources(*PACKAGES):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id in SHARED:
                    where.setdefault(t.id, []).append(str(path.relative_to(ROOT)))
    twice = {name: files for name, files in where.items() if len(files) > 1}
    assert not twice, twice
    assert set(where) >= {"DATASETS", "MODELS", "STRATEGIES", "MAX_QSGD_LEVELS", "BANDWIDTHS_GBPS"}
    literal = [str(p.relative_to(ROOT)) for p in sources(*PACKAGES) if re.search(r"\b32767\b", p.read_text())]
    assert literal == ["adpsgd_jax/limits.py"], literal  # the QSGD level limit, written out once


def module_of(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_experiments_import_each_name_from_its_definition_and_no_private_one():
    # One address per name: no re-export (a name imported from a module that only imports it itself), no
    # private name (``_name``) imported or read from another module (nor jax's), no unused import kept for callers.
    trees = {module_of(p): ast.parse(p.read_text()) for p in sources("experiments")}
    defined = {}
    for module, tree in trees.items():
        names = defined.setdefault(module, set())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            for t in node.targets if isinstance(node, ast.Assign) else [node.target] \
                    if isinstance(node, ast.AnnAssign) else []:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    problems = []
    for module, tree in trees.items():
        aliases = {}  # local name -> the experiments module it is
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in trees:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    elif alias.name.startswith("_") or alias.name not in defined.get(node.module, ()):
                        problems.append(f"{module} imports {alias.name} from {node.module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                source = aliases[node.value.id]
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    problems.append(f"{module} reads {source}.{node.attr}")
                elif node.attr not in defined[source] and f"{source}.{node.attr}" not in trees:
                    problems.append(f"{module} reads {source}.{node.attr}, which {source} does not define")
    problems += [f"{module_of(p)} keeps an unused import" for p in sources("experiments") if "noqa: F401" in p.read_text()]
    problems += [f"{module_of(p)} uses jax's private jax._src" for p in sources("experiments") if "jax._src" in p.read_text()]
    assert not problems, problems


GENERATED = ("report.md", "bench.md", "study.md", "study_fragments.md")  # tables that the report, the benchmark
# and the study write


def markdown_references():
    texts = [p for p in sources(*PACKAGES, "tests") if p.name != "test_layout.py"]
    texts += [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*"))]
    for path in texts:
        text = re.sub(r"https?://\S+", "", path.read_text())
        for name in sorted(set(re.findall(r"[\w./-]*[\w-]\.md\b", text))):
            if pathlib.PurePath(name).name not in GENERATED:
                yield path, name


@pytest.mark.parametrize("path,name", list(markdown_references()),
                         ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, pathlib.Path) else v)
def test_every_named_markdown_file_exists(path, name):
    candidates = [ROOT / name, path.parent / name, *(ROOT / d / name for d in ("docs", "notebooks"))]
    assert any(c.is_file() for c in candidates), f"{path.relative_to(ROOT)} names {name}, which is not in the repository"
