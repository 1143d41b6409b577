"""Package import graph and layering figures, read with `ast` over the repo (no imports executed).

    python tools/import_graph.py [--rev REV]   # REV: a git revision to read instead of the work tree

Prints: package -> first-party packages it imports (module-level and function-level together), then the
figures: imports inside functions / all imports, modules over 400 lines, module-level environment reads.
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SKIP = {".venv", ".git", "node_modules", "build", "dist", "__pycache__"}
ENV_CALLS = {"getenv", "environ"}


def _files(root: Path, rev: str | None) -> dict[str, str]:
    if rev:
        names = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "--name-only", rev],
                               capture_output=True, text=True, check=True).stdout.split()
        return {n: subprocess.run(["git", "-C", str(root), "show", f"{rev}:{n}"], capture_output=True,
                                  text=True, check=True).stdout
                for n in names if n.endswith(".py") and not SKIP & set(n.split("/"))}
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*.py")
            if not SKIP & set(p.relative_to(root).parts)}


def _env_read(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in ENV_CALLS and isinstance(n.value, ast.Name) \
                and n.value.id == "os":
            return True
        if isinstance(n, ast.Name) and n.id == "getenv":
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    files = _files(root, args.rev)
    packages = {n.split("/")[0] for n in files if "/" in n and n.split("/")[0] + "/__init__.py" in files}
    graph: dict[str, set[str]] = defaultdict(set)
    total = inner = fp_total = fp_inner = pr_total = pr_inner = 0
    long_modules, env_reads = [], []
    for name, text in sorted(files.items()):
        tree = ast.parse(text, filename=name)
        pkg = name.split("/")[0] if "/" in name else None
        if text.count("\n") > 400:
            long_modules.append((text.count("\n"), name))
        # module level: every statement outside a def/lambda body (class bodies run at import too)
        stack: list[tuple[ast.AST, bool]] = [(tree, False)]
        while stack:
            node, in_func = stack.pop()
            for child in ast.iter_child_nodes(node):
                func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    total += 1
                    inner += func
                    mods = ([a.name for a in child.names] if isinstance(child, ast.Import)
                            else [child.module or ""] if child.level == 0 else [pkg or ""])
                    first_party = any(m.split(".")[0] in packages for m in mods)
                    fp_total += first_party
                    fp_inner += first_party and func
                    if first_party and pkg in packages and pkg != "tests":
                        pr_total += 1
                        pr_inner += func
                    for m in mods:
                        top = m.split(".")[0]
                        if pkg and top in packages and top != pkg:
                            graph[pkg].add(top)
                elif not func and isinstance(child, ast.expr) and not isinstance(child, ast.Lambda) \
                        and _env_read(child) and not isinstance(node, ast.expr):
                    env_reads.append(f"{name}:{child.lineno}")
                stack.append((child, func))
    print("package graph (package -> first-party packages it imports):")
    for p in sorted(packages):
        print(f"  {p} -> {', '.join(sorted(graph[p])) or '-'}")
    print(f"imports inside functions: {inner} of {total} (first-party: {fp_inner} of {fp_total};"
          f" first-party in product packages, tests excluded: {pr_inner} of {pr_total})")
    print(f"modules over 400 lines: {len(long_modules)}")
    for n, m in sorted(long_modules, reverse=True):
        print(f"  {n:5d} {m}")
    print(f"environment reads at import (module level): {len(env_reads)}")
    for e in env_reads:
        print(f"  {e}")


if __name__ == "__main__":
    sys.exit(main())
