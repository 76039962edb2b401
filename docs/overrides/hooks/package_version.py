"""MkDocs hook: the version of keras-moe, shown in the header of every page.

The version is read from `keras_moe/__init__.py` without importing the
package (which would import Keras and a backend), and made available to the
templates as `config.extra.package_version`.
"""

import ast
import pathlib

from mkdocs.exceptions import PluginError


def package_version(init_file):
    tree = ast.parse(pathlib.Path(init_file).read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(
                isinstance(target, ast.Name) and target.id == "__version__"
                for target in node.targets
            )
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    raise PluginError(f'No `__version__ = "..."` in {init_file}')


def on_config(config):
    root = pathlib.Path(config.config_file_path).parent
    config.extra["package_version"] = package_version(
        root / "keras_moe" / "__init__.py"
    )
    return config
