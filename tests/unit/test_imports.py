"""The package's import graph: no circle, no upward import, a pure method (docs/architecture.md, "Floors").

Every `import` and `from ... import` in piplay_ray counts, wherever it stands (inside functions and
`if TYPE_CHECKING:` too): a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "piplay_ray"

# A module may import its own folder and any lower floor; root modules are the shared vocabulary.
FLOORS = {
    "": 0,  # config, records, roles, errors, fault, rundir, assets, registry
    "monitor": 1, "retrieval": 1, "weight_sync": 1,
    "cluster": 2,
    "learner": 3,
    "engines": 4,
    "method": 5,
    "teacher": 6, "actors": 6,
    "evolution": 7,
    "commands": 8,
    "cli": 9,
    "__main__": 10,
}
PURE = ("method",)  # never imports Ray, DeepSpeed or vLLM
HEAVY = ("ray", "deepspeed", "vllm")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules `path` imports: piplay_ray modules resolved to the module (a `from pkg import mod` counts
    as `pkg.mod`), others by their top-level name."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t not in known and "." in t and t.startswith("piplay_ray."):
                t = t.rpartition(".")[0]
            out.add(t)
    return out - {name, "piplay_ray"}


def graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {name: imports(path, name, known) for name, path in files.items()}


def floor_of(module: str) -> tuple[str, int]:
    """(folder, floor) of a piplay_ray module; a root module's folder is ""."""
    parts = module.split(".")[1:]
    folder = parts[0] if parts and (len(parts) > 1 or parts[0] in FLOORS) else ""
    if folder not in FLOORS:
        raise AssertionError(f"{module}: folder {folder!r} has no floor in FLOORS (add it, and to the docs)")
    return folder, FLOORS[folder]


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v] & set(g):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(g.items()):
        folder, floor = floor_of(mod)
        for t in sorted(targets):
            if not t.startswith("piplay_ray."):
                continue
            t_folder, t_floor = floor_of(t)
            if t_folder != folder and t_floor >= floor:
                bad.append(f"{mod} (floor {floor}) imports {t} (floor {t_floor})")
    return bad


def test_no_circle_and_no_upward_import():
    g = graph(PACKAGE)
    assert circles(g) == []
    assert upward(g) == []


def test_the_method_is_pure():
    g = graph(PACKAGE)
    bad = [f"{m} imports {t}" for m, ts in g.items() if floor_of(m)[0] in PURE
           for t in ts if t.split(".")[0] in HEAVY]
    assert bad == []


def test_at_most_twelve_root_modules_and_every_folder_says_what_it_holds():
    root = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(root) <= 12, root
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 8, f"{init}: a docstring saying what the folder holds"


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "piplay_ray"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_planted_circle_and_upward_import_are_found(tmp_path):
    """The checks above can fail: a circle through a lazy import, and a root module importing a folder."""
    root = _plant(tmp_path, {
        "__init__.py": "", "config.py": "def f():\n    from piplay_ray.method import rewards\n",
        "method/__init__.py": "", "method/rewards.py": "from piplay_ray import config\n",
        "method/qa.py": "from piplay_ray.method.rewards import x\n",
    })
    g = graph(root)
    assert circles(g) == [["piplay_ray.config", "piplay_ray.method.rewards"]]
    assert upward(g) == ["piplay_ray.config (floor 0) imports piplay_ray.method.rewards (floor 5)"]


def test_an_unknown_folder_must_be_given_a_floor(tmp_path):
    root = _plant(tmp_path, {"__init__.py": "", "attic/__init__.py": "", "attic/old.py": "import os\n"})
    with pytest.raises(AssertionError, match="attic"):
        upward(graph(root))
