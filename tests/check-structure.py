#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The shape of the house, checked: no include cycle among the project's C files, and no C file
over the line limit.

A module is a source file and its header of the same name (service/guest.c + service/guest.h),
with any source that has no header of its own but defines what that header declares
(service/guest-peer.c).
A file that includes a project header depends on that header's module: `#include "stream.h"`
in service/guest.c is the edge guest -> stream. Layers call down and hear back through
callbacks, so these edges must form no cycle; where they do, every cycle is named, one path
through it, with the includes that close it.

Usage: check-structure.py [SOURCE_ROOT] [--max-lines N]
"""

import os
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
# Where the project's C lives (tests are checked for their size only: they are no rooms).
ROOMS = ("service", "ctl")
SIZED = ("service", "ctl", "tests")
# The build's include path for project headers (meson: service_inc), after the file's own folder.
INCLUDE_DIRS = ("service",)
MAX_LINES = 900


def c_files(root, tops):
    for top in tops:
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "build")
            for name in sorted(files):
                if name.endswith((".c", ".h")):
                    yield os.path.relpath(os.path.join(folder, name), root)


DEFINITION = re.compile(r'^(?!static\b)[A-Za-z_][\w \t\*]*?\b([A-Za-z_]\w*)\s*\([^;]*$', re.M)


def module(path):
    return os.path.splitext(path)[0]


def owners(root, files):
    """{source without a header of its own: the module whose header declares what it defines}.

    guest-peer.c, whose functions guest.h declares, is part of the guest module: its includes
    are the guest's, or a cycle through it would go unseen."""
    result = {}
    for path in files:
        if not path.endswith(".c") or os.path.exists(os.path.join(root, module(path) + ".h")):
            continue
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        defined = set(DEFINITION.findall(text)) - {"main", "if", "for", "while", "switch", "return"}
        if not defined:
            continue
        for header in INCLUDE.findall(text):
            target = resolve(root, path, header)
            if target is None or not target.endswith(".h"):
                continue
            with open(os.path.join(root, target), encoding="utf-8", errors="replace") as f:
                declared = f.read()
            if any(re.search(r"\b%s\s*\(" % re.escape(name), declared) for name in defined):
                result[path] = module(target)
                break
    return result


def resolve(root, including, header):
    for folder in (os.path.dirname(including),) + INCLUDE_DIRS:
        candidate = os.path.normpath(os.path.join(folder, header))
        if os.path.isfile(os.path.join(root, candidate)):
            return candidate
    return None  # a system header, or a generated one


def graph(root):
    """{module: {module it depends on: [(file, header), ...]}}"""
    edges = {}
    files = list(c_files(root, ROOMS))
    owner = owners(root, files)
    for path in files:
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        src = owner.get(path, module(path))
        edges.setdefault(src, {})
        for header in INCLUDE.findall(text):
            target = resolve(root, path, header)
            if target is None:
                continue
            dst = owner.get(target, module(target))
            if dst != src:
                edges[src].setdefault(dst, []).append((path, header))
                edges.setdefault(dst, {})
    return edges


def strongly_connected(edges):
    """Tarjan's algorithm, iterative: the components of more than one module."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        result.append(sorted(component))
    return result


def one_cycle(edges, component):
    """A shortest path from the component's first module back to itself, inside it."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(edges[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return component + [start]


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    limit = MAX_LINES
    args = list(argv[1:])
    while args:
        a = args.pop(0)
        if a == "--max-lines":
            limit = int(args.pop(0))
        else:
            root = a
    failed = False

    edges = graph(root)
    for component in strongly_connected(edges):
        failed = True
        cycle = one_cycle(edges, component)
        print(f"include cycle among {len(component)} modules: {', '.join(component)}")
        print(f"  one path: {' -> '.join(cycle)}")
        for a, b in zip(cycle, cycle[1:]):
            f, h = edges[a][b][0]
            print(f"    {f} includes \"{h}\"")

    for path in c_files(root, SIZED):
        if not path.endswith(".c"):
            continue
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            n = sum(1 for _ in f)
        if n > limit:
            failed = True
            print(f"{path}: {n} lines, over the limit of {limit}: split it by what its parts are")

    n_edges = sum(len(v) for v in edges.values())
    print(f"{len(edges)} modules, {n_edges} include edges between them, limit {limit} lines a C file")
    print("FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
