"""The stages stay apart (DESIGN.md §5): every draftsmith import, lazy ones included, is checked."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "draftsmith"

BASE = {"utils", "config", "__init__"}
LOW = BASE | {"engines"}
# stage -> the draftsmith stages it may import (itself included)
ALLOWED = {
    "utils": {"utils", "__init__"},
    "config": {"utils", "config"},
    "engines": LOW,
    "targets": BASE | {"targets"},
    "models": BASE | {"models"},  # models never imports target
    "data": LOW | {"data", "targets"},
    "features": LOW | {"data", "targets", "models", "features"},
    "decoding": LOW | {"data", "targets", "models", "decoding"},
    "train": LOW | {"data", "targets", "models", "features", "train"},  # train never imports decoding
    "eval": LOW | {"data", "targets", "models", "features", "decoding", "eval"},  # never train
    "export": LOW | {"data", "targets", "models", "features", "decoding", "export"},
    "serve": LOW | {"data", "targets", "models", "features", "decoding", "eval", "export", "serve"},
}
TOP = {"cli", "drafters", "quickstart", "__main__"}  # the wiring may import anything


def stage_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def draftsmith_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "draftsmith":
                names = [f"draftsmith.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "draftsmith":
                dep = parts[1] if len(parts) > 1 else "__init__"
                is_module = (SRC / dep).is_dir() or (SRC / f"{dep}.py").is_file()
                yield node.lineno, dep if is_module else "__init__"  # e.g. draftsmith.__version__


def test_every_stage_is_known():
    stages = {stage_of(p) for p in SRC.rglob("*.py")}
    unknown = stages - set(ALLOWED) - TOP - {"__init__"}
    assert not unknown, f"add these to the layer map: {unknown}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_import_layers(path):
    stage = stage_of(path)
    if stage in TOP or stage == "__init__":
        return
    bad = [f"{path.relative_to(SRC)}:{line} imports draftsmith.{dep}"
           for line, dep in draftsmith_imports(path) if dep not in ALLOWED[stage]]
    assert not bad, "layer violation:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from draftsmith.decoding import loop\n    import draftsmith.train.x\n")
    assert list(draftsmith_imports(f)) == [(2, "decoding"), (3, "train")]
    f.write_text("from draftsmith import __version__, cli\n")
    assert list(draftsmith_imports(f)) == [(1, "__init__"), (1, "cli")]
