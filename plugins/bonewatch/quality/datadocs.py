"""GX Data Docs for the validation runs of the ingest: GX's own static site, one page per run.

The nightly run keeps each delivery chunk's validation result in the store (`dq_validations`,
per-row lists removed). `build_data_docs` loads them into a throw-away file-backed GX context and
lets GX's SiteBuilder render the site into a folder of the dashboard, so the Data Docs of every
validation run in the dashboard's window sit next to it and are linked from it.

GX's templates load Bootstrap, jQuery, Popper, bootstrap-table, bootstrap-datepicker, Font
Awesome and Vega from public CDNs and its logo from the vendor's S3 bucket (with the data
context's id in the URL). A hospital dashboard must open with no network and call nobody, so
every page GX writes is rewritten (`offline_page`): each CDN file is replaced by the same file
vendored in `static/vendor/` (copied into the site, loaded by a relative path; `static/README.md`
names each package, version and licence), the logo is GX's local copy, remote links become text
and anything else remote is dropped. GX's usage statistics are off (`bonewatch.quality.gx_context`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from bonewatch.quality import gx_context

log = logging.getLogger(__name__)

SITE = "bonewatch"

#: the vendored CSS/JS, committed with their licences (see static/README.md)
VENDOR = Path(__file__).with_name("static") / "vendor"
#: where the site keeps them, relative to its root (GX's own assets sit in static/ too)
ASSETS = "static/vendor"

#: every CDN file GX Core 1.x's page templates load -> the same file in `VENDOR`
#: (popper and bootstrap.js are byte-identical to the integrity hashes GX's template pins)
CDN = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap-4.3.1/dist/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap-4.3.1/dist/js/bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery-3.7.1/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js-1.12.9/dist/umd/popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table-1.19.1/dist/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table-1.19.1/dist/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    # GX asks for the 1.19.0 stylesheet of the extension (minified on the index, not on the run
    # pages) beside the 1.19.1 script: the 1.19.1 file, minified, serves both
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker-1.9.0/dist/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker-1.9.0/dist/js/bootstrap-datepicker.min.js",
    # the same package's minified build (153 KB instead of 883 KB)
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-dark-1.1.0/dist/css/bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome-free-6.6.0/css/all.min.css",
    # "@5"/"@6" resolve to the newest release of that major version; these were the newest
    "https://cdn.jsdelivr.net/npm/vega@5": "vega-5.33.1/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite-5.23.0/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed-6.29.0/build/vega-embed.min.js",
}

_Q = r"""(["'])"""   # an attribute's quote; the value runs to the same quote (group referenced as \1)
_REMOTE = r"(?:https?:)?//[^\"'\s>]+"
_SCRIPT = re.compile(r"<script\b[^>]*?\bsrc=" + _Q + "(" + _REMOTE + r")\1[^>]*>\s*</script>", re.I)
_LINK = re.compile(r"<link\b[^>]*?\bhref=" + _Q + "(" + _REMOTE + r")\1[^>]*>", re.I)
_IMAGE = re.compile(r"<img\b[^>]*?\bsrc=" + _Q + "(" + _REMOTE + r")\1[^>]*>", re.I)
_ANCHOR = re.compile(r"<a\b[^>]*?\bhref=" + _Q + _REMOTE + r"\1[^>]*>(.*?)</a>", re.I | re.S)
_CSS_URL = re.compile(r"url\(\s*([\"']?)" + _REMOTE + r"\1\s*\)", re.I)
# GX's footer: a newsletter sign-up link to the vendor, nothing about the data
_FOOTER = re.compile(r"<footer\b[^>]*>(?:(?!</footer>).)*?https?://(?:(?!</footer>).)*</footer>", re.I | re.S)
# Integrity and CORS attributes: a file:// response is opaque to them, and the browser refuses it.
_SRI = re.compile(r"""\s(?:integrity|crossorigin)=(["'])[^"']*\1""", re.I)
# GX's references to its own static/ folder, written with its own (sometimes wrong) depth
_OWN_STATIC = re.compile(r"""\b(src|href)=(["'])(?:\./|(?:\.\./)+)static/""", re.I)
_LEFT = re.compile(r"(?i)(?:\bhttps?:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+")
_GX_LOGO = "static/images/logo-long.png"


def _vendored(tag: re.Match, prefix: str, page: str) -> str:
    """A CDN <script>/<link> pointed at its vendored copy; a tag for a file not vendored is
    dropped (logged: the page may miss a style or a script, it never loads it from elsewhere)."""
    url = tag.group(2)
    local = CDN.get(url if not url.startswith("//") else "https:" + url)
    if local is None:
        log.warning("data docs: %s: dropped a reference to %s (not vendored)", page, urlparse(url).netloc or url)
        return ""
    return _SRI.sub("", tag.group(0).replace(url, f"{prefix}{ASSETS}/{local}"))


def offline_page(html: str, depth: int = 0, back_href: str = "", page: str = "page") -> str:
    """A GX page (HTML, or a stylesheet) that loads nothing from elsewhere (pure).

    `depth`: the page's folder depth below the site's root (index.html: 0), to write relative
    paths into `static/`. CDN files become the vendored copies, GX's logo its local copy, remote
    links plain text, remote CSS images `none`; any other remote <script>, <link> or <img> is
    dropped. Given `back_href`, a link back to the dashboard opens the body.
    """
    prefix = "../" * depth
    html = _SCRIPT.sub(lambda m: _vendored(m, prefix, page), html)
    html = _LINK.sub(lambda m: _vendored(m, prefix, page), html)
    html = _IMAGE.sub(lambda m: m.group(0).replace(m.group(2), prefix + _GX_LOGO)
                      if "great-expectations-web-assets" in m.group(2) else "", html)
    html = _FOOTER.sub("", html)
    html = _ANCHOR.sub(lambda m: m.group(2), html)
    html = _CSS_URL.sub("none", html)
    html = _OWN_STATIC.sub(lambda m: f"{m.group(1)}={m.group(2)}{prefix}static/", html)
    if back_href:
        html = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + f'<a class="bonewatch-back d-block px-5 py-2 '
                      f'border-bottom" href="{back_href}">&larr; bonewatch data-quality dashboard: validation '
                      "runs</a>", html, count=1)
    if left := _LEFT.search(html):
        log.warning("data docs: %s keeps a remote reference to %s", page, left.group(0))
    return html


def run_name(row: Mapping) -> str:
    """The run's name in the Data Docs: night, feed, delivery (short) and chunk."""
    night = row.get("night") or "no-night"
    return f"{night}-{row['feed']}-{str(row['delivery_id'])[:12]}-{int(row['seq'])}"


def make_offline(folder: Path, back: str = "") -> int:
    """Rewrite every HTML page and stylesheet GX wrote under `folder` with `offline_page` and
    copy the vendored files into `folder/static/vendor`; return the number of files rewritten.

    `back`: the dashboard page to link back to, relative to `folder` ('' for none).
    """
    folder = Path(folder)
    shutil.copytree(VENDOR, folder / ASSETS, dirs_exist_ok=True)
    vendored = folder / ASSETS
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix not in {".html", ".css"} or vendored in path.parents:
            continue
        depth = len(path.relative_to(folder).parts) - 1
        link = "../" * depth + back if back and path.suffix == ".html" else ""
        text = path.read_text("utf-8")
        path.write_text(offline_page(text, depth, link, page=path.relative_to(folder).as_posix()), "utf-8")
        count += 1
    return count


def build_data_docs(folder: Path, runs: Iterable[Mapping]) -> dict[tuple[str, int], str]:
    """Build GX Data Docs for these validation runs into `folder` (a sub-folder of the dashboard).

    In: rows with delivery_id, seq, feed, night, validated_at and result (GX validation result
    JSON, str or dict). Out: (delivery_id, seq) -> the run page's path relative to `folder`.
    Every page opens offline (`make_offline`).
    """
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    folder = Path(folder).resolve()
    runs = list(runs)
    pages: dict[tuple[str, int], str] = {}
    with tempfile.TemporaryDirectory(prefix="bonewatch-gx-") as root:
        context = gx_context("file", project_root_dir=root)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("great_expectations"):
                logging.getLogger(name).setLevel(logging.WARNING)
        context.variables.data_docs_sites = {SITE: {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }}
        schema = ExpectationSuiteValidationResultSchema()
        keys = {}
        suites: dict[str, list] = {}
        for row in runs:
            document = row["result"]
            document = json.loads(document) if isinstance(document, str) else document
            result = schema.load(document)
            validated = row["validated_at"]
            if isinstance(validated, str):
                validated = datetime.fromisoformat(validated)
            key = ValidationResultIdentifier(
                ExpectationSuiteIdentifier(name=result.suite_name),
                RunIdentifier(run_name=run_name(row), run_time=validated),
                f"{row['feed']}-{str(row['delivery_id'])[:12]}",
            )
            context.validation_results_store.set(key, result)
            keys[(str(row["delivery_id"]), int(row["seq"]))] = key
            # the suite as these runs checked it (the latest run's wins): GX's index links its page
            suites[result.suite_name] = [r.expectation_config for r in result.results]
        if not keys:
            return pages
        for name, configs in suites.items():
            context.suites.add(gx.ExpectationSuite(name=name, expectations=configs))
        context.build_data_docs(site_names=[SITE])
        for ident, key in keys.items():
            urls = context.get_docs_sites_urls(resource_identifier=key, site_name=SITE, only_if_exists=True)
            if not urls or not urls[0].get("site_url"):
                continue
            path = Path(unquote(urlparse(urls[0]["site_url"]).path))
            pages[ident] = path.relative_to(folder).as_posix()
    make_offline(folder, back="../validations.html")   # the dashboard sits above the site
    log.info("data docs: %d validation run page(s) in %s", len(pages), folder)
    return pages
