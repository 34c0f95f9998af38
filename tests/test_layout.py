"""The layout stays the pipeline: the source's folders import one another without a circle, the ground
(cxr14/) imports no folder above it, no folder holds more than 35 % of the lines, no function runs over
60 lines. Read from the source's own imports (ast), not by running it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUND = "cxr14"
MOST_SHARE = 0.35
MOST_LINES = 60


def _folders() -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests",))


def _sources() -> dict[str, list[Path]]:
    """{folder: its .py files}, run.py on its own; tests and examples left out."""
    found = {name: sorted((ROOT / name).rglob("*.py")) for name in _folders()}
    return found | {"run.py": [ROOT / "run.py"]}


def _imported(path: Path, folders: set[str]) -> set[str]:
    """The project folders a file imports, at module level or inside a function alike."""
    got = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            got |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            got.add(node.module.split(".")[0])
    return got & folders


def _graph() -> dict[str, set[str]]:
    folders = set(_folders())
    return {
        name: set().union(*(_imported(p, folders) for p in files)) - {name}
        for name, files in _sources().items()
    }


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports between folders, [] where there is none (depth-first search)."""
    state, trail = {}, []

    def visit(name: str) -> list[str]:
        state[name] = "open"
        trail.append(name)
        for other in sorted(graph.get(name, ())):
            if state.get(other) == "open":
                return trail[trail.index(other) :] + [other]
            if other not in state and (found := visit(other)):
                return found
        state[name] = "done"
        trail.pop()
        return []

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return []


def test_the_folders_import_one_another_without_a_circle():
    graph = _graph()
    assert len(graph) > 5, graph  # the source was found
    assert _circle(graph) == [], " -> ".join(_circle(graph))


def test_the_circle_finder_finds_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_ground_imports_no_folder_above_it():
    assert _graph()[GROUND] == set()


def test_no_folder_holds_more_than_its_share_of_the_lines():
    lines = {
        name: sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
        for name, files in _sources().items()
    }
    total = sum(lines.values())
    shares = {name: round(count / total, 3) for name, count in lines.items()}
    assert max(shares.values()) <= MOST_SHARE, shares


@pytest.mark.parametrize("folder", [*_folders(), "run.py"])
def test_no_function_runs_over_sixty_lines(folder):
    long = []
    for path in _sources()[folder]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MOST_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long
