"""MkDocs hook: ship KaTeX and Mermaid with the site, and load nothing else.

The site renders its equations with KaTeX and its diagrams with Mermaid.
Both are taken from their npm packages at build time, at the pinned
versions below, and copied into the built site under `assets/vendor/`, so
that the documentation works without a network connection and makes no
request to a CDN.

The first build runs `npm pack` to fetch the two packages (npm must be on
`PATH`); the tarballs are checked against the pinned sha512 integrity and
kept in a cache directory, so that later builds need neither npm nor the
network. The cache is `$KERAS_MOE_DOCS_CACHE` if set, otherwise
`keras-moe-docs` in the user's cache directory. To build on a machine
without npm or network access, put the tarballs made by
`npm pack katex@<version> mermaid@<version>` elsewhere into that
directory.

After the build, every HTML and CSS file of the site is checked for assets
(scripts, stylesheets, fonts, images, preconnects) loaded from another
host; each one found is a warning, which fails a `--strict` build.
"""

import base64
import hashlib
import html.parser
import os
import pathlib
import re
import shutil
import subprocess
import tarfile
import tempfile

from mkdocs.exceptions import PluginError
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File

log = get_plugin_logger("vendored_assets")

# name -> (version, npm integrity, files taken from the package, relative to
# the package root; a trailing "/" takes a whole directory).
PACKAGES = {
    "katex": (
        "0.16.47",
        "sha512-Eeo8Ys1doU1z+x8AZsPpQu+p/QcZBI5PeOo7QGQdy2x2m0MU/hYagBbGOmXw"
        "r5KVbEfVuWv9LpnQWeehogurjg==",
        (
            "LICENSE",
            "dist/katex.min.js",
            "dist/katex.min.css",
            "dist/contrib/auto-render.min.js",
            "dist/fonts/",
        ),
    ),
    "mermaid": (
        "11.17.2",
        "sha512-V6K3C8EBdEsPFZXSKMJe6ppQOENxuHARr9GvHX4hh47lAbhMRD9qf4oEK7Lo"
        "aRQxULMa80/qt5gHO73aCleBBg==",
        ("LICENSE", "dist/mermaid.min.js"),
    ),
}

# Where the files land in the site: assets/vendor/<name>/<path without dist/>.
SITE_DIR = "assets/vendor"

_assets = {}  # site path -> absolute path of the extracted file


def cache_dir():
    if os.environ.get("KERAS_MOE_DOCS_CACHE"):
        return pathlib.Path(os.environ["KERAS_MOE_DOCS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return pathlib.Path(base) / "keras-moe-docs"


def _integrity(path):
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode("ascii")


def _npm_pack(spec, destination):
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            f"Building the documentation needs {spec} from the npm registry, "
            "and `npm` is not on PATH. Install Node.js (npm), or put the "
            f"tarball made by `npm pack {spec}` on another machine into "
            f"{destination} (or the directory named by "
            "$KERAS_MOE_DOCS_CACHE)."
        )
    with tempfile.TemporaryDirectory(dir=destination) as tmp:
        result = subprocess.run(
            [npm, "pack", spec, "--ignore-scripts", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        tarballs = list(pathlib.Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise PluginError(
                f"`npm pack {spec}` failed (exit {result.returncode}):\n"
                + (result.stderr or result.stdout)[-2000:]
            )
        name, version = spec.rsplit("@", 1)
        target = destination / f"{name}-{version}.tgz"
        os.replace(tarballs[0], target)
    return target


def _wanted(member, files):
    """The entry of `files` that takes `member`, and where it goes."""
    name = member.name.removeprefix("package/")
    if member.isfile() and ".." not in name.split("/"):
        for wanted in files:
            if name == wanted or (
                wanted.endswith("/") and name.startswith(wanted)
            ):
                return wanted, name.removeprefix("dist/")
    return None, None


def _extract(tarball, files, target):
    tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent))
    try:
        found = set()
        with tarfile.open(tarball) as archive:
            for member in archive:
                wanted, relative = _wanted(member, files)
                if wanted is None:
                    continue
                found.add(wanted)
                path = tmp / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as source:
                    path.write_bytes(source.read())
        missing = [w for w in files if w not in found]
        if missing:
            raise PluginError(f"{tarball.name} has no {', '.join(missing)}")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # else another build extracted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def vendor(name):
    """Returns the directory holding the pinned files of package `name`."""
    version, integrity, files = PACKAGES[name]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{name}-{version}"
    if target.is_dir():
        return target
    tarball = cache / f"{name}-{version}.tgz"
    if not tarball.exists():
        log.info(f"Fetching {name}@{version} with npm into {cache}")
        tarball = _npm_pack(f"{name}@{version}", cache)
    if _integrity(tarball) != integrity:
        raise PluginError(
            f"{tarball} does not match the pinned integrity of "
            f"{name}@{version}; delete it to fetch it again."
        )
    _extract(tarball, files, target)
    return target


def on_config(config):
    _assets.clear()
    for name in PACKAGES:
        root = vendor(name)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                site_path = f"{SITE_DIR}/{name}/{path.relative_to(root)}"
                _assets[site_path.replace(os.sep, "/")] = str(path)
    config.extra["vendored"] = {
        name: version for name, (version, _, _) in PACKAGES.items()
    }
    return config


def on_files(files, config):
    for site_path, path in _assets.items():
        files.append(File.generated(config, site_path, abs_src_path=path))
    return files


# --- No asset from another host -------------------------------------------

# Link relations under which a browser fetches the target.
_FETCHING_RELS = {
    "stylesheet",
    "preload",
    "modulepreload",
    "prefetch",
    "preconnect",
    "dns-prefetch",
    "icon",
    "apple-touch-icon",
    "manifest",
}
_SOURCE_ATTRIBUTES = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "iframe": ("src",),
    "embed": ("src",),
    "video": ("src", "poster"),
    "audio": ("src",),
    "object": ("data",),
}
_EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)
_CSS_URL = re.compile(
    r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:[a-z][a-z0-9+.-]*:)?//[^'")\s]+)""",
    re.I,
)


class _AssetFinder(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        names = _SOURCE_ATTRIBUTES.get(tag, ())
        if tag == "link":
            rels = set((attrs.get("rel") or "").lower().split())
            if rels & _FETCHING_RELS:
                names = ("href",)
        for name in names:
            value = attrs.get(name) or ""
            # A srcset lists "URL [descriptor]" candidates.
            urls = value.split(",") if name == "srcset" else [value]
            for url in urls:
                url = url.strip().split(" ")[0]
                if _EXTERNAL.match(url):
                    self.found.append(f"<{tag} {name}={url}>")
        if attrs.get("style"):
            self.found += _CSS_URL.findall(attrs["style"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.found += _CSS_URL.findall(data)


def external_assets(text, kind="html"):
    """The assets that `text` (HTML or CSS) loads from another host."""
    if kind == "css":
        return _CSS_URL.findall(text)
    finder = _AssetFinder()
    finder.feed(text)
    finder.close()
    return finder.found


def on_post_build(config):
    site = pathlib.Path(config.site_dir)
    for path in sorted(site.rglob("*")):
        kind = path.suffix.lstrip(".")
        if kind not in ("html", "css") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for asset in sorted(set(external_assets(text, kind))):
            log.warning(
                f"{path.relative_to(site)} loads an asset from another host: "
                f"{asset}"
            )
