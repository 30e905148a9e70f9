"""No step imports another step: every import in tasks/ against the layout ``tasks/__init__.py``
states (a step imports shared modules, schemas and its own package; shared imports shared)."""

from __future__ import annotations

import ast
from pathlib import Path

from tasks import SHARED_MODULES

TASKS = Path(__file__).resolve().parent.parent / "tasks"

# Imports the layout forbids, kept only until the files being rewritten lose them: each entry
# is (importer, imported). Empty it as they go; test_known_imports_still_occur says when.
KNOWN: set[tuple[str, str]] = {
    # the gate reads and walks DICOM with the de-identification package's own reader
    ("tasks.verify", "tasks.deidentify.dataset"),
    ("tasks.verify", "tasks.deidentify.rewrite"),
    ("tasks.verify", "tasks.deidentify.study"),
    ("tasks.verify", "tasks.deidentify.walk"),
    # a returned segmentation is checked by the gate's structure check (verify.check_structure)
    ("tasks.labels.segmentations", "tasks.verify"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(TASKS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(TASKS.rglob("*.py"))}


def package_of(name: str, path: Path) -> str | None:
    """The package a module may import freely (``tasks.labels``); None for a top-level one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return None if package == "tasks" else package


def imports(name: str, path: Path, source: str) -> list[tuple[int, str]]:
    """(line, module under tasks) of every import in ``source``, functions' own included."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, a.name) for a in node.names if a.name.startswith("tasks")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base != "tasks" and not base.startswith("tasks."):
                continue
            for alias in node.names:  # ``from tasks import verify`` imports tasks.verify
                submodule = f"{base}.{alias.name}"
                found.add((node.lineno, submodule if submodule in MODULES else base))
    return sorted(found)


def violations(name: str, path: Path, source: str) -> list[tuple[int, str]]:
    """(line, imported) of each import the layout forbids the module ``name``."""
    shared = name in SHARED_MODULES
    package = package_of(name, path)
    out = []
    for line, target in imports(name, path, source):
        if target == "tasks" or target in SHARED_MODULES:
            continue
        if not shared and package and (target == package or target.startswith(f"{package}.")):
            continue
        out.append((line, target))
    return out


def test_no_step_imports_another_step():
    found = [f"{path.relative_to(TASKS.parent)}:{line}: {name} imports {target}"
             for name, path in MODULES.items()
             for line, target in violations(name, path, path.read_text())
             if (name, target) not in KNOWN]
    assert not found, ("a step may import only shared modules (tasks/__init__.py), schemas "
                       "and its own package:\n" + "\n".join(found))


def test_known_imports_still_occur():
    gone = sorted(pair for pair in KNOWN if pair[1] not in {
        target for _, target in violations(pair[0], MODULES[pair[0]],
                                           MODULES[pair[0]].read_text())})
    assert not gone, f"remove from KNOWN in {Path(__file__).name}: {gone}"


def test_shared_modules_exist():
    assert MODULES.keys() >= SHARED_MODULES, sorted(SHARED_MODULES - MODULES.keys())


def test_the_check_names_a_step_importing_a_step():
    export = TASKS / "export.py"
    source = ("from tasks import publish, zones\nimport tasks.verify\n"
              "def f():\n    from tasks.labels.form import write_form\n")
    assert violations("tasks.export", export, source) == [
        (1, "tasks.publish"), (2, "tasks.verify"), (4, "tasks.labels.form")]
    inside = ("from tasks.labels.form import STUDY_SYSTEM\nfrom . import agreement\n"
              "from tasks.deidentify.text import IdentifierMatcher\n")
    assert violations("tasks.labels.intake", TASKS / "labels" / "intake.py", inside) == []
    assert violations("tasks.zones", TASKS / "zones.py", "from tasks.publish import x\n") == [
        (1, "tasks.publish")]
