"""The layer rules, read from the source: arrows point down (kernels <- framework <- plugins),
the framework never imports a plugin, no plugin module imports another."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kernels": "limner.kernels", "framework": "limner", "plugins": "limner.plugins"}


def imports(path: Path, package: str, top_level_only: bool = False) -> set[str]:
    """Every module `path` imports - anywhere in it (functions too), or only at its top level -
    as absolute names (`from x import y` counts x and x.y: y may be a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")
                module = ".".join(base[: len(base) - node.level] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` imports x, not the package around it
            found |= ({module} if node.module else set()) | {f"{module}.{alias.name}" for alias in node.names}
    return found


def modules(folder: str):
    for path in sorted((ROOT / folder).glob("*.py")):
        name = PACKAGES[folder] + ("" if path.stem == "__init__" else f".{path.stem}")
        # a module's relative imports resolve against its package: __init__ is the package itself
        yield name, path, imports(path, f"{name}.__init__" if path.stem == "__init__" else name)


def limner_imports(found: set[str]) -> set[str]:
    return {m for m in found if m == "limner" or m.startswith("limner.")}


def test_the_scanner_sees_relative_and_function_level_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from . import x\nfrom .y import z\ndef f():\n    import limner.plugins.samplers\n")
    assert {"limner.x", "limner.y", "limner.y.z", "limner.plugins.samplers"} <= imports(src, "limner.m")


@pytest.mark.parametrize("name,path,found", list(modules("kernels")), ids=lambda v: getattr(v, "name", ""))
def test_kernels_import_nothing_of_limner_but_kernels(name, path, found):
    outside = {m for m in limner_imports(found) if not m.startswith("limner.kernels")}
    assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}: kernels sit below the framework"


@pytest.mark.parametrize("name,path,found", list(modules("framework")), ids=lambda v: getattr(v, "name", ""))
def test_the_framework_never_imports_a_plugin(name, path, found):
    plugins = {m for m in found if m.startswith("limner.plugins")}
    assert not plugins, f"{path.relative_to(ROOT)} imports {sorted(plugins)}: reach components through the registry"


@pytest.mark.parametrize("name,path,found", list(modules("plugins")), ids=lambda v: getattr(v, "name", ""))
def test_no_plugin_module_imports_another(name, path, found):
    others = {m for m in found if m.startswith("limner.plugins.") and not m.startswith(name)
              and not (m.rpartition(".")[0] == "limner.plugins" and m.rpartition(".")[2].isupper())}
    # (a constant of the package itself, its catalogue limner.plugins.SAMPLERS, is data, not a plugin)
    if name == "limner.plugins":  # the catalogue names its modules only as "module:attr" strings
        others = {m for m in found if m.startswith("limner.plugins")}
    assert not others, f"{path.relative_to(ROOT)} imports {sorted(others)}: a plugin stands alone"


def framework_graph(top_level_only: bool) -> dict[str, set[str]]:
    """limner module -> the limner modules it imports (framework only)."""
    names = {name for name, _, _ in modules("framework")}
    graph = {}
    for name, path, _ in modules("framework"):
        found = imports(path, f"{name}.__init__" if path.stem == "__init__" else name, top_level_only)
        graph[name] = (found & names) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle through the graph found by depth-first search (each reported once)."""
    found, seen = [], set()

    def visit(node, stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycle = stack[stack.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle + [nxt])
            elif len(stack) < len(graph):
                visit(nxt, stack + [nxt])
    for start in sorted(graph):
        visit(start, [start])
    return found


def test_module_level_imports_of_the_framework_form_no_cycle():
    assert cycles(framework_graph(top_level_only=True)) == []


def test_no_import_of_the_framework_closes_a_cycle_even_inside_functions():
    assert cycles(framework_graph(top_level_only=False)) == []


NAMING_CALLS = {"component", "components", "ComponentConfig", "create", "get_component"}
# parameters that pick a component by name (a kind's singular, or the metrics' `features`)
PICKERS = {"sampler", "schedule", "dataset", "text_encoder", "denoiser", "generator", "discriminator", "loss",
           "metric", "features", "captioner", "attention", "backend"}


def constants(node: ast.AST | None) -> list[str]:
    """The strings an expression evaluates to when it is a literal: "x", a if c else "y", ("x", "y")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return constants(node.body) + constants(node.orelse)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for e in node.elts for v in constants(e)]
    return []


def component_names_in(path: Path, builtins: set[str]) -> list[str]:
    """Built-in component names a module's code names itself: string arguments (after the kind)
    of the calls that pick a component, string defaults of function parameters, strings a
    function returns, tables of names (an UPPER_CASE constant naming two or more) and names compared with a
    picker (`backend == "sdpa"`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Return):  # return "sdpa", return "cpu" if fits else "sdpa"
            found += [v for v in constants(node.value) if v in builtins]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            table = [v for v in constants(node.value) if v in builtins]
            found += table if len(table) > 1 else []  # one hit may be another namespace's word ("linear" betas)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            picks = any((getattr(s, "id", None) or getattr(s, "attr", None)) in PICKERS | {"name"} for s in sides)
            found += [v for s in sides for v in constants(s) if picks and v in builtins]
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in NAMING_CALLS:
                found += [a.value for a in node.args[1:] if isinstance(a, ast.Constant) and a.value in builtins]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # sampler="euler", features="..."
            positional = node.args.posonlyargs + node.args.args
            pairs = list(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            found += [
                d.value for a, d in pairs if a.arg in PICKERS and isinstance(d, ast.Constant) and d.value in builtins
            ]
    return found


def test_the_scanner_sees_component_names_in_calls_and_defaults(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('a = component("samplers", "euler")\ndef f(x, schedule="karras", *, sampler="heun", kind="shapes"): '
                   'pass\nb = create("datasets", name)\n')
    assert sorted(component_names_in(src, {"euler", "heun", "karras", "shapes"})) == ["euler", "heun", "karras"]
    src.write_text('CANDIDATES = ("sdpa", "math")\ndef g(q):\n    if backend == "triton":\n        pass\n'
                   '    return "cpu" if q else "sdpa"\nkind = "shapes"\nOK = "shapes"\n')
    found = component_names_in(src, {"sdpa", "math", "triton", "cpu", "shapes"})
    assert sorted(found) == ["cpu", "math", "sdpa", "sdpa", "triton"]  # what framework/attention.py did


@pytest.mark.parametrize("name,path,found", list(modules("framework")), ids=lambda v: getattr(v, "name", ""))
def test_the_framework_names_no_built_in_component(name, path, found):
    """Defaults come from the shipped configs, never from the framework's code."""
    import limner

    builtins = {n for names in limner.list_components().values() for n in names}
    named = component_names_in(path, builtins)
    assert not named, f"{path.relative_to(ROOT)} names built-in components {named}: take them from a config"


def test_sampling_imports_no_training_code():
    """`limner sample`'s machinery (pipelines, the sampling path, the recipe dispatch and
    evaluation) loads without the training loop; only a recipe's own module brings it."""
    import subprocess
    import sys

    code = ("import sys, limner.pipeline, limner.sampling, limner.recipes, limner.evaluation; "
            "training = ('limner.train', 'limner.guard', 'limner.ema', 'accelerate'); "
            "print(sorted(m for m in sys.modules if m in training))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
