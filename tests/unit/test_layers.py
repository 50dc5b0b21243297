"""The package's layering (STYLE section 8), read off the source with `ast`: DAGs -> pipeline ->
ingest / rules / notify / dashboard -> store -> units, errors, model. A change that bends it
fails here, not in a code review."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "plugins" / "bonewatch"
#: the shell's top (CLI, demo, web app, Airflow glue) may call the pipeline; nothing below it may
ABOVE_PIPELINE = {"bonewatch.pipeline", "bonewatch.cli", "bonewatch.demo", "bonewatch.web", "bonewatch.orchestration"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("bonewatch")}


def test_nothing_below_the_pipeline_imports_it():
    offenders = {name for name, path in modules().items()
                 if name not in ABOVE_PIPELINE and "bonewatch.pipeline" in imports(path)}
    assert offenders == set()


def test_only_the_pipeline_flushes_the_outbox():
    """Only `notify` sends (the pipeline's notify step): a second flusher sent digests twice."""
    flushers = {name for name, path in modules().items()
                if name != "bonewatch.notify.outbox" and "outbox.flush(" in path.read_text("utf-8")}
    assert flushers == {"bonewatch.pipeline"}


def test_module_level_imports_have_no_cycle():
    known = modules()
    graph = {name: {dep for dep in imports(path, top_level_only=True) if dep in known and dep != name}
             for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return trail + [node, dep]
            if dep not in state and (cycle := visit(dep, trail + [node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for name in sorted(graph) if name not in state and (c := visit(name, []))]
    assert cycles == []
