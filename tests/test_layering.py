"""The import contract: the package is layered like timm, and this test fails on any import that breaks it.

    core  <-  families, origins  <-  pipeline (plan, adapt, weights, builder, dynamic, flexi, registry, hub, ...)  <-  apps

- ``timm_anysize.core`` imports nothing of timm-anysize above it;
- ``families`` and ``origins`` import only the core (and timm), never each other; one family module never imports
  another (code two families share lives in the core or in ``families/_shared.py``);
- the pipeline imports no app; nothing but an app (and ``__main__``) imports ``timm_anysize.apps``;
- no function-level import between the package's own modules (a sign that code sits in the wrong layer);
- no import cycle;
- timm's private modules (``timm.*._*``) are imported by one module only, ``timm_anysize.core.timm_private``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "timm_anysize"
TIMM_PRIVATE_HOME = "timm_anysize.core.timm_private"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import in ``path``; relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    # An import inside `if TYPE_CHECKING:` or `try:` at module level is still module level.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top_level, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import mod` imports the module pkg.mod where there is one
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*sub.split("."))
                ).is_dir()
                out.append((sub if is_module else target, id(node) in top_level, node.lineno))
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in ("core", "families", "origins", "apps"):
        return parts[1]
    if parts[1] in ("__main__", "configs"):
        return parts[1]
    return "pipeline"


# What each layer may import of the package (besides itself).
ALLOWED = {
    "core": set(),
    "families": {"core"},
    "origins": {"core"},
    "pipeline": {"core", "families", "origins", "pipeline"},
    "root": {"core", "families", "origins", "pipeline"},
    "apps": {"core", "families", "origins", "pipeline", "root", "apps"},
    "__main__": {"apps"},
    "configs": set(),
}


def _own(target: str) -> bool:
    return target == "timm_anysize" or target.startswith("timm_anysize.")


def test_layers() -> None:
    bad = []
    for module, imports in GRAPH.items():
        layer = _layer(module)
        for target, _, line in imports:
            if not _own(target):
                continue
            other = _layer(target)
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {layer} imports {other} ({target})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_families_and_origins_are_self_contained() -> None:
    """A family module imports no other family module (only ``families/_shared.py``); an origin no other origin
    module except its shared ``mapping``."""
    shared = {"timm_anysize.families._shared", "timm_anysize.origins.mapping"}
    bad = []
    for module, imports in GRAPH.items():
        layer = _layer(module)
        if layer not in ("families", "origins") or module in (f"timm_anysize.{layer}",):
            continue
        for target, _, line in imports:
            if _layer(target) == layer and target not in shared and target != module:
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_function_level_imports_of_our_own_modules() -> None:
    bad = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {target}"
        for m, imports in GRAPH.items()
        for target, top, line in imports
        if _own(target) and not top
    ]
    assert not bad, "function-level imports between our modules (move the code to the right layer):\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    edges = {m: {t for t, _, _ in imports if t in MODULES and t != m} for m, imports in GRAPH.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle through them.
    for m in list(edges):
        edges[m] = {t for t in edges[m] if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_timm_private_imports_live_in_one_module() -> None:
    bad = []
    for module, imports in GRAPH.items():
        for target, _, line in imports:
            private = target.startswith("timm.") and any(p.startswith("_") for p in target.split(".")[1:])
            if private and module != TIMM_PRIVATE_HOME:
                bad.append(f"{module}:{line}: {target}")
    assert not bad, f"timm's private modules are imported only in {TIMM_PRIVATE_HOME}:\n" + "\n".join(bad)


def test_the_contract_catches_a_violation(tmp_path: Path) -> None:
    """The checker itself can fail: a core module importing the pipeline is found."""
    fake = tmp_path / "timm_anysize" / "core"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text(
        "from timm_anysize.plan import make_plan\n\ndef f():\n    from timm_anysize import registry\n"
    )
    global PACKAGE
    saved = PACKAGE
    try:
        PACKAGE = tmp_path / "timm_anysize"
        imports = _imports(fake / "x.py")
    finally:
        PACKAGE = saved
    assert ("timm_anysize.plan", True, 1) in imports
    assert any(t.startswith("timm_anysize") and not top for t, top, _ in imports)
    assert _layer("timm_anysize.plan") not in ALLOWED[_layer("timm_anysize.core.x")]
