"""Griffe extension: Keras-style classes in the API reference.

Two things that Griffe does not know about Keras layers:

- A layer that takes its constructor from a Keras class (`GatedConv2D`
  takes `keras.layers.Conv2D`'s) has no `__init__` of its own, and Keras is
  not among the packages Griffe loads, so the page would show no signature.
  The inherited `__init__` is found by reading the base class's source
  module (statically: nothing is imported), following the re-exports of
  Keras's public modules to the module that defines it.
- Keras docstrings have a `Call arguments:` section, in the format of
  `Args:`. Griffe takes it for an admonition and runs its entries together;
  it is parsed here like `Args:` and shown as a list titled
  "Call arguments".

Loaded by mkdocstrings (`extensions` in mkdocs.yml).
"""

import functools
import importlib.util
import pathlib
import textwrap

import griffe

# How many re-exports and base classes to follow at most.
_MAX_HOPS = 10


@functools.lru_cache(maxsize=None)
def _visit_module(module_name):
    """The module `module_name`, read from its source file, or None."""
    top, *rest = module_name.split(".")
    if not top:
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if rest:
        if not spec.submodule_search_locations:
            return None
        base = pathlib.Path(list(spec.submodule_search_locations)[0])
        base = base.joinpath(*rest)
        candidates = [base / "__init__.py", base.with_suffix(".py")]
    else:
        candidates = [pathlib.Path(spec.origin or "")]
    for path in candidates:
        if path.suffix == ".py" and path.is_file():
            return griffe.visit(
                module_name, path, path.read_text(encoding="utf-8")
            )
    return None


def _base_path(base):
    return base.canonical_path if isinstance(base, griffe.Expr) else str(base)


def inherited_init(path, hops=0):
    """The `__init__` that the class at `path` defines or inherits."""
    if hops > _MAX_HOPS:
        return None
    module_name, _, name = path.rpartition(".")
    module = _visit_module(module_name) if module_name else None
    member = module.members.get(name) if module else None
    if member is None:
        return None
    if member.is_alias:
        return inherited_init(member.target_path, hops + 1)
    if not member.is_class:
        return None
    if "__init__" in member.members:
        return member.members["__init__"]
    for base in member.bases:
        init = inherited_init(_base_path(base), hops + 1)
        if init is not None:
            return init
    return None


def _objects(obj):
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield member
        if member.is_module or member.is_class:
            yield from _objects(member)


def _has_init(cls):
    try:
        return "__init__" in cls.all_members
    except griffe.AliasResolutionError:
        return "__init__" in cls.members


def _add_external_init(cls):
    for base in cls.bases:
        init = inherited_init(_base_path(base))
        if init is not None:
            cls.set_member(
                "__init__",
                griffe.Function("__init__", parameters=init.parameters),
            )
            return


def _parse_call_arguments(docstring):
    sections = docstring.parsed
    for index, section in enumerate(sections):
        if not (
            section.kind is griffe.DocstringSectionKind.admonition
            and section.value.annotation == "call-arguments"
        ):
            continue
        as_args = griffe.Docstring(
            "",
            parent=docstring.parent,
            parser=docstring.parser,
            parser_options={
                **(docstring.parser_options or {}),
                "warn_unknown_params": False,
            },
        )
        # Set after construction, which would dedent the entries.
        as_args.value = "Args:\n" + textwrap.indent(
            section.value.description, "    "
        )
        as_args = as_args.parsed
        if (
            len(as_args) == 1
            and as_args[0].kind is griffe.DocstringSectionKind.parameters
        ):
            as_args[0].title = "Call arguments:"
            sections[index] = as_args[0]


class KerasLayers(griffe.Extension):
    def on_package(self, *, pkg, **kwargs):
        for obj in _objects(pkg):
            if obj.is_class and not _has_init(obj):
                _add_external_init(obj)
            if obj.docstring is not None and obj.docstring.parser:
                _parse_call_arguments(obj.docstring)
