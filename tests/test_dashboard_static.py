"""The dashboard's files in-process: `/` serves the page, `/static/` its script and styles, the
page needs nothing from outside the server (no CDN), and every element the script looks up
exists. Behaviour in a real browser is the e2e tier's (tests/e2e/test_dashboard_browser.py)."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import pytest

from marble.scheduler.sampling_params import SamplingParams
from tests.server_helpers import serving

pytestmark = pytest.mark.anyio

STATIC = resources.files("marble.server").joinpath("static")
FILES = ("index.html", "app.js", "style.css")


async def test_page_and_assets_are_served(llada_tiny_path):
    async with serving(llada_tiny_path) as (_, client):
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
            r = await client.get("/" + asset)
            assert r.status_code == 200, asset
        js = await client.get("/static/app.js")
        assert "javascript" in js.headers["content-type"]
        assert (
            (await client.get("/static/style.css")).headers["content-type"].startswith("text/css")
        )


@pytest.mark.parametrize("name", FILES)
def test_no_external_resources(name):
    text = STATIC.joinpath(name).read_text(encoding="utf-8")
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", text), "the page loads from outside"
    assert not re.search(r"(?:fetch|EventSource|import)\(\s*[\"'`](?:https?:)?//", text)
    assert not re.search(r"@import\s+url\(\s*[\"']?(?:https?:)?//", text)


def test_every_element_the_script_uses_exists():
    html = STATIC.joinpath("index.html").read_text(encoding="utf-8")
    js = STATIC.joinpath("app.js").read_text(encoding="utf-8")
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"]+)"\)', js))
    assert used and used <= ids, f"missing in index.html: {sorted(used - ids)}"


def test_script_speaks_the_event_contract():
    """The native stream's event names (DESIGN.md) are the ones the script listens for."""
    js = STATIC.joinpath("app.js").read_text(encoding="utf-8")
    for name in (
        "request.queued",
        "request.started",
        "step",
        "block.committed",
        "snapshot",
        "request.completed",
        "error",
    ):
        assert f'"{name}"' in js, name
    assert "v1/diffusion/generate" in js and "v1/diffusion/events" in js


def test_form_fields_are_sampling_params():
    """Each form field is named after the SamplingParams field it sends (the script fills them
    from the served defaults by that name), and the default prompt is Python code, what the
    embedded model was trained on."""
    html = STATIC.joinpath("index.html").read_text(encoding="utf-8")
    form = html[html.index('<form id="generate-form"') : html.index("</form>")]
    names = set(re.findall(r'<(?:input|select)[^>]*\bid="([^"]+)"', form)) - {"api-key"}
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert names and names <= fields, f"not SamplingParams fields: {sorted(names - fields)}"
    prompt = re.search(r'<textarea id="prompt"[^>]*>(.*?)</textarea>', form, re.S).group(1)
    assert prompt.startswith("def ") and prompt.endswith(":\n"), prompt
