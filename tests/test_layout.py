"""The house rules that code review alone would miss: no import cycles, lazy CLI imports, resolvable doc links."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mirrorla"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every mirrorla module ``path`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("mirrorla")}
    return found


def test_no_import_cycles_in_the_package():
    """Import graph of src/mirrorla (function-level imports included; package __init__ files re-export and are
    left out as importers): it must be acyclic."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        if path.name == "__init__.py":
            continue
        graph[name] = {t for t in _imports(path, name) if t in modules and t != name
                       and modules[t].name != "__init__.py"}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for node in graph:
        if state.get(node) is None and visit(node, [node]):
            break
    assert not cycle, " -> ".join(cycle)


def test_info_help_does_not_import_the_training_stack():
    code = ("import sys; from mirrorla.tools.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('mirrorla.tools.train', 'mirrorla.tools.compare', 'mirrorla.tools.bench', "
            "'mirrorla.tools.analyze', 'mirrorla.tools.data', 'torch.distributed.run', 'timm.scheduler', "
            "'timm.optim') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_every_docs_reference_in_the_code_resolves():
    """``docs/NAME.md`` and ``docs/NAME.md §N.M`` in source files point to a file and a section that exist."""
    refs = 0
    for path in list(SRC.rglob("*.py")) + list(SRC.rglob("*.cpp")):
        for match in re.finditer(r"docs/([\w-]+\.md)(?:`?\s*§([\d.]+))?", path.read_text()):
            refs += 1
            doc = ROOT / "docs" / match.group(1)
            assert doc.is_file(), f"{path.name} cites {doc.relative_to(ROOT)}, which does not exist"
            if match.group(2):
                section = match.group(2).rstrip(".")
                headings = re.findall(r"^#+ ([\d.]+)\.? ", doc.read_text(), flags=re.M)
                assert section in {h.rstrip(".") for h in headings}, f"{path.name} cites {doc.name} §{section}"
    assert refs > 0


def test_readme_layout_names_existing_modules():
    import importlib

    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    names = re.findall(r"`(mirrorla(?:\.\w+)+)`", layout)
    assert names
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(module), attr), name
    listed = set(re.findall(r"\b([\w]+\.(?:py|sh|md|cpp))\b", layout.split("```")[1]))
    present = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}
    assert listed and listed <= present, sorted(listed - present)
    shipped = {p.name for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert shipped <= listed, f"modules missing from the README's layout: {sorted(shipped - listed)}"
