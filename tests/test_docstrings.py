"""The code examples in public docstrings run and print what they say.

Examples are fenced ```python blocks. A line `expression  # value` is
checked: the expression must evaluate to the literal `value`.
"""

import ast
import importlib
import inspect
import pathlib
import re
import textwrap

import keras
import numpy as np
import pytest

import keras_moe

PUBLIC_MODULES = [
    "keras_moe.layers",
    "keras_moe.models",
    "keras_moe.training",
    "keras_moe.data",
    "keras_moe.analysis",
]
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def public_objects():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            yield f"{module_name}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and callable(member):
                        yield f"{module_name}.{name}.{attr}", member


def own_doc(obj):
    """The object's own docstring, not one inherited from Keras."""
    return obj.__doc__ or ""


EXAMPLES = [
    pytest.param(block, id=f"{qualname}[{i}]")
    for qualname, obj in public_objects()
    for i, block in enumerate(FENCE.findall(own_doc(obj)))
]


def test_every_public_symbol_is_documented():
    for qualname, obj in public_objects():
        if qualname.count(".") == 2 or inspect.isclass(obj):
            doc = inspect.getdoc(obj)
            assert doc and len(doc) > 40, f"{qualname} has no docstring"


def test_layers_have_examples():
    for name in keras_moe.layers.__all__:
        obj = getattr(keras_moe.layers, name)
        if inspect.isclass(obj):
            assert FENCE.search(obj.__doc__), f"{name} has no example"


@pytest.mark.parametrize("block", EXAMPLES)
def test_docstring_example_runs(block):
    namespace = {"np": np, "keras": keras, "keras_moe": keras_moe}
    source = textwrap.dedent(block)
    for statement in ast.parse(source).body:
        segment = ast.get_source_segment(source, statement)
        line = source.splitlines()[statement.end_lineno - 1]
        expected = re.search(r"#\s*(.+)$", line)
        code = compile(ast.Module([statement], []), "<docstring>", "exec")
        if isinstance(statement, ast.Expr) and expected:
            value = eval(
                compile(ast.Expression(statement.value), "<doc>", "eval"),
                namespace,
            )
            assert value == ast.literal_eval(expected.group(1)), segment
        else:
            exec(code, namespace)


def test_every_public_symbol_has_a_reference_entry():
    docs = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"
    entries = set(
        re.findall(
            r"^::: (keras_moe\.[\w.]+)$",
            "\n".join(p.read_text() for p in docs.glob("*.md")),
            re.M,
        )
    )
    missing = [
        qualname
        for qualname, _ in public_objects()
        if qualname.count(".") == 2 and qualname not in entries
    ]
    assert not missing, f"no API reference entry for {missing}"
