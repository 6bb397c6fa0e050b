"""The package's layers point one way (issue 27): each module imports only from its own layer or the ones below.

    errors, paddle_compat, plots  <  files  <  config  <  core  <  posthoc  <  integrations  <  demo, command lines

Every import form is read (``from x import y``, ``import x``, ``importlib.import_module("x")``, ``__import__``). The
engine imports no feature (they are registered from above it, in ``ema_callback/__init__.py``), the config
imports neither the engine nor a suite's adapter (a suite's YAML reader lives with its adapter), and a module named
``cli`` or ``launch_*`` is a command line, the top.
"""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ema_callback")
RANK = {"errors": 0, "paddle_compat": 0, "plots": 0, "__version__": 0, "files": 1, "config": 2, "core": 3, "posthoc": 4,
        "integrations": 5, "demo": 6, "cli": 6, "__init__": 7}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "cli" or parts[-1].startswith("launch_"):
        return RANK["cli"]
    return RANK.get(parts[1], RANK["__init__"]) if len(parts) > 1 else RANK["__init__"]


def imports():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
            module = module[:-len(".__init__")] if module.endswith(".__init__") else module
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                for target in _targets(node):
                    if target.startswith("ema_callback"):
                        yield module, target


def _targets(node) -> list:
    """The ``ema_callback`` modules one node imports: ``from x import y`` (a name of the package itself: the
    submodule ``y``), ``import x.y``, and ``importlib.import_module("x")`` / ``__import__("x")`` with a constant."""
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "ema_callback":
            return [f"ema_callback.{alias.name}" for alias in node.names]
        return [node.module]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
            isinstance(node.args[0].value, str):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def test_every_import_points_down_or_sideways():
    upward = sorted({f"{m} -> {t}" for m, t in imports()
                     if m != "ema_callback" and layer_of(t) > layer_of(m)})
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_engine_builds_the_features_registered_above_it():
    from ema_callback.core.features import builders

    names = [b.__qualname__.split(".")[0] for b in builders()]
    assert names == ["PosthocProfiles", "SwitchEMA", "BatchNormRecompute"]
