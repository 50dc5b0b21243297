"""GX Data Docs that open in a hospital with no network and call nobody: every page and stylesheet
loads only files of the site (the CDN files GX names are vendored with their licences), and
building them opens no connection (GX usage statistics off). The pages in Chromium, network cut:
tests/integration/test_dashboard.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from bonewatch.quality import datadocs, gx_context, suites
from tests.integration.dq_feeds import remote_references

#: src/href attributes and CSS url()s: what a page or a stylesheet loads or links to
LOCAL_REF = re.compile(r"""\b(?:src|href)=(["'])(.*?)\1|url\(\s*(["']?)([^"')]+)\3\s*\)""", re.I)


def _runs() -> list[dict]:
    """Two validation runs from the real suites on tiny chunks: labs failing, events passing."""
    labs = pd.DataFrame({"patient_id": ["A1", None], "result_id": ["r1", "r2"], "analyte": ["alp", "calcium"],
                         "status": ["final", "unheard-of"], "collected_at": [pd.Timestamp("2025-06-20")] * 2,
                         "value": [100.0, 2.3], "delivery_id": ["d" * 20] * 2})
    events = pd.DataFrame({"patient_id": ["A1"], "event_type": ["weight_kg"], "occurred_at": [pd.Timestamp("2025-06-20")],
                           "value": ["71"], "number": [71.0], "delivery_id": ["e" * 20]})
    with suites.keep_results() as kept:
        suites.validate("labs", labs, {"alp": (10, 1000)})
        suites.validate("events", events, {})
    return [{"delivery_id": k["delivery_id"], "seq": 1, "feed": k["kind"], "night": "2025-06-20",
             "validated_at": datetime(2025, 6, 21, 1, 30), "result": json.dumps(k["result"])} for k in kept]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(the Data Docs folder, the run pages, the hosts anything tried to reach while GX built them)."""
    runs = _runs()
    folder = tmp_path_factory.mktemp("dashboard") / "datadocs"
    reached: list[str] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            reached.append(str(address[0]))
            raise OSError("no network in this test")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            reached.append(str(host))
            raise socket.gaierror("no network in this test")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_getaddrinfo
    try:
        pages = datadocs.build_data_docs(folder, runs)
    finally:
        socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    return folder, pages, reached


def test_data_docs_reference_nothing_remote(site):
    folder, pages, _ = site
    assert len(pages) == 2
    assert remote_references(folder) == {}
    for page in folder.rglob("*.html"):
        html = page.read_text("utf-8")
        assert "integrity=" not in html and "crossorigin=" not in html, page   # refused on file://
    index = (folder / "index.html").read_text("utf-8")
    assert 'src="static/vendor/jquery-3.7.1/dist/jquery.min.js"' in index
    assert 'src="static/images/logo-long.png"' in index and "dataContextId" not in index
    assert 'href="../validations.html"' in index                 # back to the dashboard


def test_every_file_a_data_docs_page_or_stylesheet_names_is_there(site):
    folder, _, _ = site
    missing, outside = [], set()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in {".html", ".css"}):
        for match in LOCAL_REF.finditer(path.read_text("utf-8")):
            ref = (match.group(2) if match.group(2) is not None else match.group(4)).split("#")[0].split("?")[0]
            if not ref or ref.startswith(("data:", "javascript:", "mailto:")) or "{" in ref:
                continue
            if ref.endswith(".ttf") and "fontawesome" in str(path):
                continue   # Font Awesome's fallback after its .woff2: a browser that reads WOFF2 never asks
            target = (path.parent / ref).resolve()
            if folder.resolve() not in target.parents:
                outside.add(target)
            elif not target.is_file():
                missing.append(f"{path.relative_to(folder)} -> {ref}")
    assert missing == []
    assert outside == {folder.resolve().parent / "validations.html"}   # the dashboard's page, built beside
    # the index links each suite's page: GX renders them from the suites the runs checked
    assert {p.name for p in (folder / "expectations").glob("*.html")} == {"labs_suite.html", "events_suite.html"}


def test_the_vendored_files_are_the_ones_gx_names_with_their_licences():
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    named = {m.group(2) for t in templates.glob("*.j2")
             for m in re.finditer(r"""<(?:script|link)\b[^>]*?\b(?:src|href)=(["'])(https?://[^"']+)\1""", t.read_text())}
    assert named and named - set(datadocs.CDN) == set(), "a CDN file GX's templates load is not vendored"
    readme = (datadocs.VENDOR.parent / "README.md").read_text("utf-8")
    for local in set(datadocs.CDN.values()):
        assert (datadocs.VENDOR / local).is_file(), local
        package = local.split("/")[0]
        assert list((datadocs.VENDOR / package).glob("LICENSE*")), f"{package} has no licence file"
        assert f"`{package}`" in readme, f"{package} is not described in static/README.md"
    # byte for byte the files GX's template pins by hash for its CDN copies
    imports = (templates / "js_script_imports.j2").read_text()
    for url, local in datadocs.CDN.items():
        pinned = re.search(re.escape(url) + r"""["'][^>]*\bintegrity=["'](sha384-[^"']+)""", imports)
        if pinned:
            digest = base64.b64encode(hashlib.sha384((datadocs.VENDOR / local).read_bytes()).digest()).decode()
            assert f"sha384-{digest}" == pinned.group(1), local


def test_building_the_data_docs_reaches_nobody_and_gx_usage_statistics_are_off(site, tmp_path):
    _, _, reached = site
    assert reached == []
    assert os.environ["GX_ANALYTICS_ENABLED"] == "false"
    context = gx_context("file", project_root_dir=tmp_path)
    assert context.variables.analytics_enabled is False
    assert "analytics_enabled: false" in (tmp_path / "gx" / "great_expectations.yml").read_text()
    assert gx_context("ephemeral").variables.analytics_enabled is False


def test_offline_page_maps_drops_and_unlinks_every_remote_reference():
    page = ('<html><head><link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"/>'
            '<script src="https://cdn.example.org/tracker.js"></script>'
            '<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js" integrity="sha384-x" '
            'crossorigin="anonymous"></script><style>a{background:url(\'https://s3.example.com/x.png\') 0 0}</style>'
            '<link rel="shortcut icon" href="../../../static/images/favicon.ico"/></head><body>'
            '<img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?dataContextId=1"/>'
            '<img src="//pixel.example.net/p.gif"/>Powered by <a href="https://greatexpectations.io">GX</a>'
            '<footer><p>newsletter <a href="https://greatexpectations.io/newsletter">Subscribe</a></p></footer>'
            "</body></html>")
    out = datadocs.offline_page(page, depth=4, back_href="../../../../../validations.html")
    assert re.search(r"(?i)(https?:)?//[a-z]", out) is None
    assert '<link rel="stylesheet" href="../../../../static/vendor/bootstrap-4.3.1/dist/css/bootstrap.min.css"/>' in out
    assert '<script src="../../../../static/vendor/bootstrap-4.3.1/dist/js/bootstrap.min.js"></script>' in out
    assert "tracker" not in out and "pixel" not in out and "Subscribe" not in out
    assert "background:none 0 0" in out and "Powered by GX" in out
    assert 'href="../../../../static/images/favicon.ico"' in out           # GX writes one ../ short
    assert '<img src="../../../../static/images/logo-long.png"/>' in out
    assert '<a class="bonewatch-back' in out and 'href="../../../../../validations.html"' in out
