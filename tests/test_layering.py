"""Imports run one way (DESIGN.md): checked on every module's source, function-local imports included.

- pickers/ never imports engine.sim or e2e (it may use engine.costmodel, engine.kvcache, engine.presets,
  engine.tokens: the fleet-side facts it reasons about);
- engine/ never imports pickers/, except the virtual-time adapters that drive the picker (routers.py) and the
  planner (autoscale.py);
- no library package (extproc/, pickers/, engine/, kernels/) imports e2e/ (tests and benchmarks live there).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "engine/sim/cluster/routers.py"
PLANNER_ADAPTER = "engine/sim/cluster/autoscale.py"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _violations(package: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{rel} imports {name}")
    return bad


def test_the_rules_see_every_package():
    assert len(_modules("pickers")) > 20 and len(_modules("engine")) > 20 and len(_modules("extproc")) > 10
    assert "pickers.config" in _imports(ROOT / ADAPTER)  # the adapter is where the seam is


@pytest.mark.parametrize("package, forbidden, allowed", [
    ("pickers", ("engine.sim", "e2e"), ()),
    ("engine", ("pickers", "e2e"), (ADAPTER, PLANNER_ADAPTER)),
    ("extproc", ("e2e", "engine.sim.cluster"), ()),
    ("kernels", ("e2e", "pickers"), ()),
])
def test_imports_run_one_way(package, forbidden, allowed):
    assert _violations(package, forbidden, allowed) == []
