"""The module graph: imports flow one way (no circle), no module reaches into another's private names, and gptj.py
and shard.py need no other project module (test_gptj.py runs the two alone)."""
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
