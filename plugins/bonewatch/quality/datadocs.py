"""GX Data Docs for the validation runs of the ingest: GX's own static site, one page per run.

The nightly run keeps each delivery chunk's validation result in the store (`dq_validations`,
per-row lists removed). `build_data_docs` loads them into a throw-away file-backed GX context and
lets GX's SiteBuilder render the site into a folder of the dashboard, so the Data Docs of every
validation run in the dashboard's window sit next to it and are linked from it.

GX's templates pull Bootstrap, jQuery, Font Awesome and Vega from CDNs. A hospital dashboard must
open with no network, so the run pages are made self-contained: external <script>/<link> tags are
removed and a small stylesheet is inlined (the pages are static tables; nothing is lost but
polish). GX's own index.html is left as GX writes it: its result list is drawn by a CDN script, so
the dashboard's "Validation runs" page is the offline index and links each run's page directly.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

SITE = "bonewatch"

_EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>", re.I)
_EXTERNAL_LINK = re.compile(r"<link[^>]*\bhref=\"https?://[^\"]*\"[^>]*/?>", re.I)
# GX's logo is fetched from S3 with the context id in the URL: a tracking pixel, never loaded here.
_EXTERNAL_IMAGE = re.compile(r"<img[^>]*\bsrc=\"https?://[^\"]*\"[^>]*/?>", re.I)
_OFFLINE_CSS = """<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:1rem 2rem;color:#1f2937}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
td,th{border:1px solid #d1d5db;padding:.3rem .5rem;vertical-align:top;text-align:left}
.card{border:1px solid #e5e7eb;border-radius:6px;margin:1rem 0;padding:.5rem 1rem}
.fa-check-circle::before{content:"\\2714";color:#15803d}.fa-times::before{content:"\\2716";color:#b91c1c}
.text-success{color:#15803d}.text-danger{color:#b91c1c}.collapse:not(.show){display:none}
.ge-cta-footer,#ge-cta-footer,footer,.d-none{display:none}
.bonewatch-back{display:block;padding:.5rem 0;border-bottom:1px solid #e5e7eb;margin-bottom:1rem}
code{background:#f3f4f6;padding:0 .2rem}
</style>"""


def offline_page(html: str, back_href: str = "") -> str:
    """A GX page without CDN references or remote images, with a small inline stylesheet and,
    given `back_href`, a link back to the dashboard (pure)."""
    html = _EXTERNAL_SCRIPT.sub("", html)
    html = _EXTERNAL_LINK.sub("", html)
    html = _EXTERNAL_IMAGE.sub("", html)
    html = html.replace("</head>", _OFFLINE_CSS + "</head>", 1)
    if back_href:
        html = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + f'<a class="bonewatch-back" href="{back_href}">'
                      "&larr; bonewatch data-quality dashboard: validation runs</a>", html, count=1)
    return html


def run_name(row: Mapping) -> str:
    """The run's name in the Data Docs: night, feed, delivery (short) and chunk."""
    night = row.get("night") or "no-night"
    return f"{night}-{row['feed']}-{str(row['delivery_id'])[:12]}-{int(row['seq'])}"


def build_data_docs(folder: Path, runs: Iterable[Mapping]) -> dict[tuple[str, int], str]:
    """Build GX Data Docs for these validation runs into `folder` (a sub-folder of the dashboard).

    In: rows with delivery_id, seq, feed, night, validated_at and result (GX validation result
    JSON, str or dict). Out: (delivery_id, seq) -> the run page's path relative to `folder`.
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
        context = gx.get_context(mode="file", project_root_dir=root)
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
        if not keys:
            return pages
        context.build_data_docs(site_names=[SITE])
        for ident, key in keys.items():
            urls = context.get_docs_sites_urls(resource_identifier=key, site_name=SITE, only_if_exists=True)
            if not urls or not urls[0].get("site_url"):
                continue
            path = Path(unquote(urlparse(urls[0]["site_url"]).path))
            relative = path.relative_to(folder)
            back = "../" * len(relative.parts) + "validations.html"   # the dashboard sits above the site
            path.write_text(offline_page(path.read_text("utf-8"), back), "utf-8")
            pages[ident] = relative.as_posix()
    log.info("data docs: %d validation run page(s) in %s", len(pages), folder)
    return pages
