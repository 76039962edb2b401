"""The documentation site's configuration, hooks and Griffe extension.

The site build itself (`mkdocs build --strict` in .ci/run) fails on any
asset loaded from another host; these tests check the pieces that make it
so, and the API reference's handling of Keras docstrings, without building
the site.
"""

import importlib.util
import pathlib

import pytest

pytest.importorskip("mkdocs")
griffe = pytest.importorskip("griffe")

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOOKS = ROOT / "docs" / "overrides" / "hooks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config():
    from mkdocs.config import load_config

    return load_config(str(ROOT / "mkdocs.yml"))


def test_no_asset_from_another_host_in_the_configuration(config):
    assert config.theme["font"] is False
    assets = [str(path) for path in config.extra_javascript]
    assets += [str(path) for path in config.extra_css]
    assert assets
    for path in assets:
        assert "//" not in path, path
    assert config.site_url.startswith("https://")
    assert config.repo_url.startswith("https://")


def test_external_assets_are_found():
    hook = _load("vendored_assets")
    page = """
    <link rel="canonical" href="https://example.org/page/">
    <link rel="stylesheet" href="https://fonts.example/css?family=A:300,400">
    <link rel="preconnect" href="//fonts.example">
    <link rel="stylesheet" href="assets/local.css">
    <script src="https://cdn.example/mermaid.js"></script>
    <script src="assets/local.js"></script>
    <img src="images/figure.png" srcset="https://cdn.example/a.png 2x">
    <a href="https://github.com/keras-moe/keras-moe">repository</a>
    <style>@font-face { src: url("https://fonts.example/f.woff2") }</style>
    """
    found = hook.external_assets(page)
    assert len(found) == 5
    assert all("example" in asset for asset in found)
    assert not any("github" in asset or "local" in asset for asset in found)
    assert "<link href=https://fonts.example/css?family=A:300,400>" in found
    css = "@import 'https://fonts.example/x.css'; a { b: url(fonts/x.woff2) }"
    assert hook.external_assets(css, "css") == ["https://fonts.example/x.css"]


def test_pinned_packages_are_complete():
    hook = _load("vendored_assets")
    assert set(hook.PACKAGES) == {"katex", "mermaid"}
    for version, integrity, files in hook.PACKAGES.values():
        assert version.count(".") == 2
        assert integrity.startswith("sha512-")
        assert "LICENSE" in files


def test_package_version_matches_the_package():
    hook = _load("package_version")
    version = hook.package_version(ROOT / "keras_moe" / "__init__.py")
    assert version
    assert f'__version__ = "{version}"' in (
        (ROOT / "keras_moe" / "__init__.py").read_text()
    )


@pytest.fixture(scope="module")
def package(config):
    options = config.plugins["mkdocstrings"].config.handlers["python"][
        "options"
    ]
    loader = griffe.GriffeLoader(
        search_paths=[str(ROOT)],
        docstring_parser=options["docstring_style"],
        docstring_options=options["docstring_options"],
        extensions=griffe.load_extensions(
            *(str(ROOT / path) for path in options["extensions"])
        ),
    )
    return loader.load("keras_moe")


def test_a_layer_gets_the_signature_of_its_keras_base_class(package):
    init = package["layers.GatedConv2D"].all_members["__init__"]
    names = [parameter.name for parameter in init.parameters]
    assert names[:4] == ["self", "filters", "kernel_size", "strides"]
    assert "kernel_initializer" in names


def test_call_arguments_are_parsed_like_args(package):
    sections = package["layers.GatedConv2D"].docstring.parsed
    parameters = [s for s in sections if s.kind.value == "parameters"]
    assert [section.title for section in parameters] == [
        None,
        "Call arguments:",
    ]
    call = parameters[1]
    assert call.title == "Call arguments:"
    assert [argument.name for argument in call.value] == ["inputs", "gates"]
    assert "SparseGatingHeads" in call.value[1].description


def test_a_returns_block_is_one_value(package):
    sections = package["layers.PatchExpertChoiceMoE.route"].docstring.parsed
    (returns,) = [s for s in sections if s.kind.value == "returns"]
    assert len(returns.value) == 1
    assert "routing_values" in returns.value[0].description
