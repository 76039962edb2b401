"""Opens the built documentation in a headless Chromium that may reach
nothing but the site, and checks that it renders without a network.

    mkdocs build -d site
    python scripts/check_site_offline.py site

Needs `pip install playwright` and a Chromium (`--chromium`, default
`/usr/bin/chromium`; or `python -m playwright install chromium`). For each
page checked it prints how many equations KaTeX rendered and how many are
left as raw TeX, whether each Mermaid diagram was drawn (rendered diagrams
take space on the page), and what a search for "GatedConv2D" finds; then
every request that tried to leave the site. It exits with status 1 if
anything is left unrendered, search finds nothing, or a request tried to
leave the site.
"""

import argparse
import functools
import http.server
import sys
import threading

PAGES = ("", "layers/", "concepts/deepmoe/", "concepts/pmoe/")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("site", help="the folder `mkdocs build` wrote")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_QuietHandler, directory=args.site)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{args.port}/"
    problems, outside = [], []

    def route(request_route):
        if request_route.request.url.startswith(base):
            request_route.continue_()
        else:
            outside.append(request_route.request.url)
            request_route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.route("**/*", route)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        for path in PAGES:
            page.goto(base + path)
            page.wait_for_timeout(3000)
            rendered = page.locator(".arithmatex .katex").count()
            raw = page.evaluate(
                "() => [...document.querySelectorAll('.arithmatex')]"
                ".filter(e => !e.querySelector('.katex')).length"
            )
            # Mermaid draws into a closed shadow root: a drawn diagram is
            # one that takes space.
            diagrams = [
                (box or {}).get("height", 0) > 50
                for box in (
                    d.bounding_box() for d in page.locator(".mermaid").all()
                )
            ]
            page.fill("input.md-search__input", "GatedConv2D")
            page.wait_for_timeout(2000)
            found = page.locator(".md-search-result__item").count()
            page.keyboard.press("Escape")
            print(
                f"/{path}: {rendered} equations rendered, {raw} raw; "
                f"diagrams drawn {diagrams}; search: {found} results"
            )
            if raw or not all(diagrams) or not found:
                problems.append(path)
        browser.close()
    server.shutdown()
    print("requests that tried to leave the site:", sorted(set(outside)))
    print("script errors:", errors)
    return 1 if problems or outside or errors else 0


if __name__ == "__main__":
    sys.exit(main())
