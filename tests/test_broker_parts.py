"""The broker's parts (brokers/core.py lists them) stay apart: no import cycle, no component
importing the Broker class, no private attribute of another object, and the reallocation
history bounded."""

from __future__ import annotations

import ast
from pathlib import Path

from brokers import admin
from brokers.core import HISTORY_MAX, new_history

BROKERS = Path(__file__).resolve().parent.parent / "brokers"


def _imports() -> dict[str, set[str]]:
    """brokers module -> the brokers modules it imports (type-checking imports included)."""
    graph: dict[str, set[str]] = {}
    for path in BROKERS.glob("*.py"):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "brokers":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("brokers."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names
                            if a.name.startswith("brokers."))
    return graph


def test_no_import_cycle_and_only_the_entry_point_imports_the_broker() -> None:
    graph = _imports()
    assert {"core", "steps", "recovery", "mover", "admin", "broker"} <= set(graph)
    assert [m for m, deps in graph.items() if "broker" in deps] == []

    def visit(module: str, path: list[str]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in path, f"import cycle: {' -> '.join([*path, dep])}"
            visit(dep, [*path, dep])

    for module in graph:
        visit(module, [module])


def test_no_private_attribute_of_another_object() -> None:
    """``x._name`` only on ``self`` (or ``cls``): the parts talk through public names."""
    found = []
    for path in BROKERS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert found == []


def test_the_reallocation_history_is_bounded() -> None:
    history = new_history()
    for i in range(HISTORY_MAX + 50):
        history.append({"reason": f"move {i}", "ok": True})
    assert len(history) == HISTORY_MAX == 100
    assert history[0]["reason"] == "move 50"
    shown = admin.reallocations(history)  # what admin status shows: the last 20, newest last
    assert [r["reason"] for r in shown] == [f"move {i}" for i in range(130, 150)]


def test_a_node_row_takes_any_subset_of_the_optional_heartbeat_figures() -> None:
    """Heartbeat fields are optional one by one (the fuzzer sent ``combine_steps`` alone)."""
    from brokers.registry import NodeInfo

    node = NodeInfo(ident=b"a", name="a", pid=1, host="h", device="cpu", dtype="float32",
                    mem_total=1, mem_free=1, gflops=1.0)
    for stats in ({}, {"combine_steps": 4}, {"combine_s": 0.5},
                  {"combine_s": 0.5, "combine_steps": 4}):
        node.stats = stats
        row = node.to_dict()
        assert row["combine_ms_per_step"] == (125.0 if len(stats) == 2 else
                                              0.0 if "combine_steps" in stats else None)
