#!/usr/bin/env python3
"""Fails when modules of different folders import each other in a circle.

For each crate, a node is a top-level module (a file or folder under src/);
an edge is a `crate::X` path in code (comments ignored). Any cycle fails, with
the modules on it. Run by .ci/run (issue 17: arrows one way).
"""
import os
import re
import sys

failed = False
for crate in ("common", "gateway", "worker"):
    root = os.path.join(os.path.dirname(__file__), "..", crate, "src")
    edges = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            top = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".rs")
            if top in ("lib", "main"):
                continue
            with open(path) as f:
                code = "\n".join(l for l in f.read().split("\n") if not l.strip().startswith("//"))
            for m in re.finditer(r"crate::([a-z_][a-z0-9_]*)", code):
                if m.group(1) != top:
                    edges.setdefault(top, set()).add(m.group(1))
    color, stack, cycles = {}, [], []

    def visit(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if color.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not color.get(v):
                visit(v)
        stack.pop()
        color[u] = 2

    for u in sorted(edges):
        if not color.get(u):
            visit(u)
    for c in cycles:
        failed = True
        print(f"{crate}: import cycle {' -> '.join(c)}")
if failed:
    sys.exit(1)
print("no import cycles between modules of different folders")
