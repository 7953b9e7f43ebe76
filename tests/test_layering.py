"""Imports point one way (DESIGN.md, Layout): convert <- vicrop_jax <- eval <- bench.

Every import in every .py under the four packages is read from its AST: module-level and
function-local, `import a.b` and `from a.b import c`, relative forms resolved against the
file's package, and `importlib.import_module("...")` with a literal name. A failure names
file:line for each import of a package a layer may not use, of the test fixtures, or of a
private name (`from a.b import _x`) of another module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The project packages each layer may import (itself included); the rest are off limits.
ALLOWED = {
    "convert": {"convert"},
    "vicrop_jax": {"vicrop_jax", "convert"},
    "eval": {"eval", "vicrop_jax", "convert"},
    "bench": {"bench", "eval", "vicrop_jax", "convert"},
}
PROJECT = {*ALLOWED, "tests"}
# Checkpoints and tokenizers for tests and benchmarks, not for the library's own modules.
TESTING = "vicrop_jax.testing"


def imports(source: str, rel: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, absolute module, names taken from it) of every import in a file at path `rel`
    (relative to the repository root, e.g. "vicrop_jax/models/llava.py")."""
    package = pathlib.PurePosixPath(rel).parent.parts  # an __init__.py's package is its folder
    out = []
    for node in ast.walk(ast.parse(source, rel)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                up = node.level - 1
                if up > len(package):
                    raise ValueError(f"{rel}:{node.lineno}: relative import above the root")
                base = package[: len(package) - up]
                module = ".".join([*base, *([module] if module else [])])
            out.append((node.lineno, module, tuple(alias.name for alias in node.names)))
        elif (
            isinstance(node, ast.Call)
            and _dotted(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value, ()))
    return sorted(out)


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def wrong_way(source: str, rel: str) -> list[str]:
    """'file:line: ...' for each import of a package above the file's layer (or tests/, or
    vicrop_jax.testing from the library)."""
    layer = rel.split("/")[0]
    allowed = ", ".join(sorted(ALLOWED[layer]))
    out = []
    for line, module, names in imports(source, rel):
        # `from .. import eval` at the root imports the names themselves as modules.
        above = [
            f"{rel}:{line}: imports {target} ({layer}/ may import only {allowed})"
            for target in ([module] if module else names)
            if target.split(".")[0] in PROJECT - ALLOWED[layer]
        ]
        taken = {module, *(f"{module}.{n}" for n in names)}
        if not above and layer in ("convert", "vicrop_jax") and TESTING in taken:
            above.append(f"{rel}:{line}: imports {TESTING} (test and benchmark code only)")
        out += above
    return out


def private_names(source: str, rel: str) -> list[tuple[str, str, str, str]]:
    """(rel, module, name, 'file:line: ...') for each private name imported from a module."""
    out = []
    package = ".".join(pathlib.PurePosixPath(rel).parent.parts)
    for line, module, names in imports(source, rel):
        parent, _, leaf = module.rpartition(".")
        if parent == package and _is_private(leaf):
            continue  # a package's private submodule shares its private names with the package
        for name in filter(_is_private, names):
            msg = f"{rel}:{line}: imports the private name {name} from {module}"
            out.append((rel, module, name, msg))
    return out


def _sources() -> list[tuple[str, str]]:
    files = sorted(p for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py"))
    assert files, f"no .py files under {sorted(ALLOWED)} in {ROOT}"
    return [(p.read_text("utf-8"), p.relative_to(ROOT).as_posix()) for p in files]


def test_imports_point_one_way():
    found = {rel: wrong_way(src, rel) for src, rel in _sources()}
    bad = [msg for msgs in found.values() for msg in msgs]
    assert not bad, "imports against DESIGN.md's layering:\n  " + "\n  ".join(bad)


def test_no_private_names_imported_across_modules():
    found = [hit for src, rel in _sources() for hit in private_names(src, rel)]
    bad = [msg for *_, msg in found]
    assert not bad, "private names imported from another module:\n  " + "\n  ".join(bad)


# The checker on snippets: each form of import it must see.
@pytest.mark.parametrize(
    ("rel", "source", "expect"),
    [
        ("convert/llava.py", "from vicrop_jax.models import llava", "vicrop_jax.models "),
        ("convert/llava.py", "import vicrop_jax", "imports vicrop_jax "),
        ("vicrop_jax/demo.py", "def f():\n    from eval import report\n", "demo.py:2"),
        ("vicrop_jax/x.py", "if True:\n    import bench.memory as m\n", "bench.memory"),
        ("vicrop_jax/models/x.py", "from ... import eval", "imports eval "),
        ("vicrop_jax/models/x.py", "from ...eval import runner", "imports eval "),
        ("vicrop_jax/x.py", "from ..bench import memory", "imports bench "),
        ("convert/sub/__init__.py", "from ... import vicrop_jax", "imports vicrop_jax "),
        ("convert/sub/__init__.py", "from ...vicrop_jax import loading", "vicrop_jax"),
        ("eval/x.py", "from bench import pipeline", "imports bench "),
        ("eval/x.py", "import importlib\nimportlib.import_module('bench.memory')", "x.py:2"),
        ("bench/x.py", "from tests.hf_reference import make_tiny_llava", "imports tests."),
        ("vicrop_jax/x.py", "from vicrop_jax.testing import build_tokenizer", "testing"),
        ("vicrop_jax/x.py", "from vicrop_jax import testing", "testing"),
        ("vicrop_jax/x.py", "def f():\n    import vicrop_jax.testing\n", "x.py:2: imports vicrop"),
        ("convert/x.py", "def f():\n    import vicrop_jax.testing\n", "convert/ may import"),
    ],
)
def test_checker_finds_wrong_way_imports(rel, source, expect):
    found = wrong_way(source, rel)
    assert len(found) == 1 and expect in found[0], found


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("vicrop_jax/x.py", "from convert.checkpoint import read_config"),
        ("vicrop_jax/models/x.py", "from .llama import LlamaConfig\nfrom .. import bbox"),
        ("eval/x.py", "from vicrop_jax.testing import build_tokenizer\nimport convert"),
        ("bench/x.py", "from eval import runner\nimport vicrop_jax.testing"),
        ("convert/x.py", "import numpy as np\nfrom . import checkpoint"),
    ],
)
def test_checker_allows_downward_imports(rel, source):
    assert wrong_way(source, rel) == []


def test_checker_finds_private_names():
    src = "from __future__ import annotations\nfrom a import __version__\n"
    src += "def f():\n    from vicrop_jax.generate import (\n        x,\n        _y,\n    )\n"
    src += "from . import _z\n"
    found = [msg for *_, msg in private_names(src, "vicrop_jax/prefix.py")]
    assert found == [
        "vicrop_jax/prefix.py:4: imports the private name _y from vicrop_jax.generate",
        "vicrop_jax/prefix.py:8: imports the private name _z from vicrop_jax",
    ]


def test_a_package_shares_private_names_with_its_private_submodules():
    src = "from eval.synthetic._layout import _rng\nfrom eval.engine import _axis\n"
    src += "from eval.other._layout import _rng\n"
    found = [msg for *_, msg in private_names(src, "eval/synthetic/__init__.py")]
    assert found == [
        "eval/synthetic/__init__.py:2: imports the private name _axis from eval.engine",
        "eval/synthetic/__init__.py:3: imports the private name _rng from eval.other._layout",
    ]
