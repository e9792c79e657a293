"""What import-linter and ruff do not check inside one package: no private name imported from
another module, no module imported by a string.

For every ``from milton.x import _name`` (``_name`` not a submodule) and every
``__import__("milton.x")`` / ``import_module("milton.x")`` in the package, one line; exit 1 if
there is any. Cycles and the layers are import-linter's (pyproject.toml); ruff's PLC2701 only
sees private imports from *other* top-level packages. Stdlib only: ``make lint`` runs it.

Usage: python scripts/check_imports.py [PACKAGE_DIR]   (default: milton)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def problems(root: Path) -> list[str]:
    package = root.name
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(root, path)
        where = path.relative_to(root.parent)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom):
                target = resolve(module, path.name == "__init__.py", node.level, node.module)
                if target.split(".")[0] != package or target == module:
                    continue
                for alias in node.names:
                    name = alias.name
                    if name.startswith("_") and not name.startswith("__") \
                            and f"{target}.{name}" not in modules:
                        found.append(f"{where}:{node.lineno}: private {name} imported from {target}")
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                first = node.args[0] if node.args else None
                if called in ("__import__", "import_module") and isinstance(first, ast.Constant) \
                        and str(first.value).startswith(f"{package}."):
                    found.append(f"{where}:{node.lineno}: string import of {first.value}")
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "milton").resolve()
    found = problems(root)
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} private or string imports in {root.name}: import public names, "
              "with import statements", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
