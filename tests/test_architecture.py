"""The import graph of src/comptrust, read with `ast`: no cycles, and no edge pointing up the layers

    cli/api/commands -> study -> {report, compress, evaluate, config} -> {perspectives, engine}
                     -> models -> store/types/errors (and other leaf utilities)

Every import counts, including the lazy ones inside functions (a lazy import is still a dependency; it only
moves the cost), except those under ``if TYPE_CHECKING:``. ``from pkg import sub`` is an edge to the submodule
``pkg.sub``; a module's own parent packages are not edges (Python runs them first in any case). The root package
``comptrust`` is the public API facade: its ``__init__`` imports nothing at module level and names its targets
as strings, so imports of ``comptrust`` itself (for ``__version__``) are not edges.

Run ``python tests/test_architecture.py`` to print the drawing: each module's layer and the modules it imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "comptrust"

# layer of each module, by the longest matching prefix; higher imports lower. A new module must be placed here.
LAYERS: dict[str, int] = {
    # 6: entry points
    "comptrust.cli": 6, "comptrust.__main__": 6, "comptrust.api": 6, "comptrust.compress.command": 6,
    "comptrust.study.command": 6, "comptrust.toxicity_command": 6, "comptrust.cache_command": 6,
    # 5: studies
    "comptrust.study": 5,
    # 4: one evaluation, one compression, the run config; the report (a pure renderer of results.StudyReport: it
    # imports only results, types and errors, so it sits below the study that builds the result)
    "comptrust.compress": 4, "comptrust.evaluate": 4, "comptrust.config": 4, "comptrust.report": 4,
    # 3: perspectives and engines (engine.llamacpp: the llama.cpp backend, an engine too)
    "comptrust.perspectives": 3, "comptrust.engine": 3, "comptrust.toxicity_scorers": 3,
    # 2: models
    "comptrust.models": 2,
    # 1: the store, types and leaf utilities
    "comptrust.store": 1, "comptrust.types": 1, "comptrust.errors": 1, "comptrust.paths": 1,
    "comptrust.failpoints": 1, "comptrust.data_sources": 1, "comptrust.results": 1, "comptrust.logs": 1,
    "comptrust.progress": 1, "comptrust.outputs": 1, "comptrust.genkwargs": 1, "comptrust.cpu": 1,
    "comptrust.extras": 1, "comptrust.suites": 1, "comptrust.tracking": 1,
}
NAMES = {6: "entry", 5: "study", 4: "compress/evaluate", 3: "perspectives/engine", 2: "models", 1: "store/types"}

# Known exceptions, each with why it stays and what would remove it. An edge listed here that no longer exists
# fails the test too, so the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {
    # (none left: the runner's unit helpers moved to study/units.py, which the runner and the Ray executor import)
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = SRC / name.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(path: Path) -> set[str]:
    me = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("comptrust."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("comptrust"):
            mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            out.update(subs)
            if len(subs) < len(node.names):  # names from the module itself
                out.add(mod)
    ancestors = {".".join(me.split(".")[:i]) for i in range(1, len(me.split(".")))}
    return {m for m in out if m != me and m not in ancestors and m != "comptrust"}


def registry_edges() -> dict[str, set[str]]:
    """The registries name their plug-ins as "module:attr" strings imported on use: edges all the same."""
    from comptrust import perspectives
    from comptrust.engine import ENGINES, SERVED

    return {
        "comptrust.perspectives": {t.split(":")[0] for t in perspectives.REGISTRY.values()},
        "comptrust.engine": {e.target.split(":")[0] for e in (*ENGINES.values(), *SERVED.values())},
    }


def graph() -> dict[str, set[str]]:
    g = {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}
    for mod, targets in registry_edges().items():
        g[mod] |= targets
    return g


def layer(mod: str) -> int | None:
    best = None
    for prefix, rank in LAYERS.items():
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rank)
    return best[1] if best else None


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    missing = [m for m in graph() if m != "comptrust" and layer(m) is None]
    assert not missing, f"place these modules in LAYERS: {missing}"


def test_no_upward_edges():
    g = graph()
    up = sorted((a, b) for a, bs in g.items() for b in bs
                if a != "comptrust" and layer(b) is not None and layer(a) is not None and layer(b) > layer(a)
                and (a, b) not in ALLOWED)
    assert not up, "imports that point up the layers:\n" + "\n".join(
        f"  {a} ({NAMES[layer(a)]}) -> {b} ({NAMES[layer(b)]})" for a, b in up)


def test_no_cycles_beyond_the_allow_list():
    g = graph()
    pruned = {a: {b for b in bs if (a, b) not in ALLOWED} for a, bs in g.items()}
    found = cycles(pruned)
    assert not found, f"import cycles: {found}"


def test_allow_list_only_names_edges_that_exist():
    g = graph()
    stale = [e for e in ALLOWED if e[1] not in g.get(e[0], set())]
    assert not stale, f"these allowed edges are gone: drop them from ALLOWED: {stale}"


def test_the_checker_sees_lazy_imports_and_ignores_type_checking(tmp_path):
    # runner imports the report only inside run_study: the checker must see that edge
    assert "comptrust.report" in graph()["comptrust.study.runner"]
    # methods.py imports the compression config only for type checking
    assert "comptrust.compress.config" not in graph()["comptrust.compress.methods"]
    # registry entries count: the engine registry names the llama.cpp server module
    assert "comptrust.engine.llamacpp" in graph()["comptrust.engine"]
    # the tiny Tarjan finds a planted cycle
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def package_edges(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph folded to comptrust's top-level packages and modules (study, engine, store, ...)."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for a, bs in g.items():
        out.setdefault(top(a), set()).update(top(b) for b in bs if top(b) != top(a))
    return out


def test_packages_point_down_too():
    for a, bs in package_edges(graph()).items():
        up = [b for b in bs if (layer(b) or 0) > (layer(a) or 0)]
        assert not up, f"{a} imports {up}, above it"


if __name__ == "__main__":  # the drawing: `python tests/test_architecture.py [--packages]`
    g = graph()
    if "--packages" in sys.argv:
        pe = package_edges(g)
        for m in sorted(pe, key=lambda x: (-(layer(x) or 0), x)):
            print(f"{layer(m)} {NAMES[layer(m) or 1]:18s} {m.removeprefix('comptrust.')} -> "
                  + ", ".join(sorted(d.removeprefix("comptrust.") for d in pe[m])))
        raise SystemExit(0)
    for rank in sorted(NAMES, reverse=True):
        print(f"== {rank} {NAMES[rank]}")
        for m in sorted(x for x in g if layer(x) == rank):
            deps = sorted(g[m], key=lambda d: (-(layer(d) or 0), d))
            print(f"  {m.removeprefix('comptrust.')}: " + ", ".join(
                d.removeprefix("comptrust.") + ("" if (layer(d) or 0) <= rank else " [UP]") for d in deps))
