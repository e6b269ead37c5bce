"""The module graph: imports flow one way (no circle), no module reaches into another's private names, and gptj.py
and shard.py need no other project module (test_gptj.py runs the two alone). And the sizes: no module over 600
lines, no function over 80."""
import ast
import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def project_modules():
    """{module: its syntax tree} for the project's own modules (not the tests, not bench/)."""
    paths = [p for p in glob.glob(os.path.join(HERE, "*.py"))
             if not os.path.basename(p).startswith("test_") and os.path.basename(p) != "conftest.py"]
    return {os.path.basename(p)[:-3]: ast.parse(open(p).read(), p) for p in paths}


def test_imports_form_no_circle_and_reach_no_private_name():
    modules = project_modules()
    imports, reaches = {}, []
    for name, tree in modules.items():
        found = set()
        for node in ast.walk(tree):  # function-level imports count too
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                found.add(node.module)
                reaches += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                  and node.value.id != name and node.attr.startswith("_") and not node.attr.startswith("__")):
                reaches.append(f"{name}: {node.value.id}.{node.attr}")
        imports[name] = found - {name}
    assert not reaches, reaches
    assert imports["gptj"] == set() and imports["shard"] == {"gptj"}, (imports["gptj"], imports["shard"])

    def circle_from(node, path):
        for nxt in sorted(imports[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = circle_from(nxt, path + [nxt])
            if found:
                return found
        return None
    circles = [c for c in (circle_from(m, [m]) for m in sorted(modules)) if c]
    assert not circles, " -> ".join(circles[0])


def test_no_module_over_600_lines_and_no_function_over_80():
    """Small enough to read: every project module (bench/ included) at most 600 lines, every function or method
    at most 80."""
    paths = [p for p in glob.glob(os.path.join(HERE, "*.py")) + glob.glob(os.path.join(HERE, "bench", "*.py"))
             if not os.path.basename(p).startswith("test_") and os.path.basename(p) != "conftest.py"]
    long_modules, long_functions = [], []
    for path in sorted(paths):
        text, name = open(path).read(), os.path.relpath(path, HERE)
        if len(text.splitlines()) > 600:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        long_functions += [f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
                           for node in ast.walk(ast.parse(text, path))
                           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                           and node.end_lineno - node.lineno + 1 > 80]
    assert not long_modules and not long_functions, long_modules + long_functions
