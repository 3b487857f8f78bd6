"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a
real server on 127.0.0.1: the form starts from the served model's defaults and sends them; a
prompt's canvas resolves step by step under its prompt and ends with the final text; "watch
all" keeps up with 16 concurrent requests and shows each one's prompt. Screenshots go to
artifacts/.

Needs `pip install playwright` and `apt-get install chromium`; never `playwright install`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from marble.model.default import CHECKPOINT_DIR
from tests.e2e.conftest import REPO, running_server

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("MARBLE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "artifacts"
# Long enough on the server (~0.6 s for 96 steps of the tiny model) to span many frames.
FIXED = {"max_tokens": 192, "steps": 96, "block_length": 48, "temperature": 0, "ignore_eos": True}
# The form's fields (element ids are SamplingParams names), its number inputs read from the page.
NUMBER_FIELDS = tuple(
    re.findall(
        r'<input id="([^"]+)"[^>]*type="number"',
        (REPO / "server" / "static" / "index.html").read_text(encoding="utf-8"),
    )
)
CHECK_FIELDS = ("token_healing", "ignore_eos")
SELECT_FIELDS = ("remasking", "cache")

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)

# Runs in the page: record every rendered state of each card (its step and a canvas digest),
# so the test sees intermediate frames however fast the server is.
RECORDER = """
window.__frames = [];
new MutationObserver((records) => {
  for (const r of records) {
    const card = r.target;
    if (!card.classList || !card.classList.contains("card")) continue;
    const canvas = card.querySelector("canvas");
    window.__frames.push({
      id: card.dataset.requestId,
      step: Number(card.dataset.step),
      state: card.dataset.state,
      masked: card.querySelector(".masked").textContent,
      canvas: canvas.toDataURL().length + ":" + canvas.toDataURL().slice(-64),
      t: performance.now(),
    });
  }
}).observe(document.getElementById("cards"), {
  subtree: true, attributes: true, attributeFilter: ["data-step", "data-state"],
});
"""


@pytest.fixture(scope="module")
def dashboard_server(llada_tiny_path: Path) -> Iterator[str]:
    """Tiny LLaDA, no API key (the page is used as a person would, with no key to type)."""
    with running_server(llada_tiny_path) as url:
        yield url


@pytest.fixture(scope="module")
def embedded_server() -> Iterator[str]:
    """The embedded default model (a Python code model with its own serving defaults)."""
    with running_server(CHECKPOINT_DIR) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: object) -> Iterator[tuple[object, list[str]]]:
    """A fresh page and the console errors / uncaught exceptions it produces."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    try:
        yield page, errors
    finally:
        context.close()


def _throttle(page: object, bytes_per_s: int) -> None:
    """Slow the page's downloads (Chrome DevTools network emulation), so that a fast server's
    step events cannot all land within one animation frame."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": bytes_per_s, "uploadThroughput": -1},
    )


def _completed(url: str, body: dict) -> dict:
    """The `request.completed` event of one native stream."""
    with httpx.stream("POST", f"{url}/v1/diffusion/generate", json=body, timeout=60) as r:
        r.raise_for_status()
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "request.completed":
                return json.loads(line[6:])
    raise AssertionError("the stream ended without request.completed")


def _served_defaults(url: str) -> dict:
    r = httpx.get(f"{url}/v1/models", timeout=10)
    r.raise_for_status()
    return r.json()["data"][0]["defaults"]


def _open(page: object, url: str) -> None:
    """Load the page and wait until the served defaults are in the form (they would overwrite
    anything typed before)."""
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('server-status').textContent === 'ready'")
    page.wait_for_function("document.body.dataset.defaults === 'loaded'")


def _watch(page: object, url: str) -> None:
    """Load the page following every request, and wait until it follows them."""
    page.goto(url + "/?watch")
    page.wait_for_function(
        "document.getElementById('watch-status').textContent === 'following every request'"
    )


def _form(page: object) -> dict:
    """What the form shows, as strings and booleans."""
    shown = {name: page.input_value(f"#{name}") for name in NUMBER_FIELDS}
    shown.update({name: page.input_value(f"#{name}") for name in SELECT_FIELDS})
    shown.update({name: page.is_checked(f"#{name}") for name in CHECK_FIELDS})
    return shown


def _js_number(value: float | None) -> str:
    """JavaScript's String(value) for the numbers the form holds ("" for null)."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


def _as_form(defaults: dict) -> dict:
    """How the form shows these defaults: a null number is an empty field."""
    shown = {name: _js_number(defaults[name]) for name in NUMBER_FIELDS}
    shown.update({name: defaults[name] for name in SELECT_FIELDS})
    shown.update({name: bool(defaults[name]) for name in CHECK_FIELDS})
    return shown


def _fill(page: object, prompt: str, params: dict) -> None:
    page.fill("#prompt", prompt)
    for name in ("max_tokens", "steps", "block_length", "temperature"):
        page.fill(f"#{name}", str(params[name]))
    page.fill("#threshold", "")
    page.set_checked("#ignore_eos", bool(params.get("ignore_eos")))


def test_prompt_resolves_step_by_step(dashboard_server: str, page: tuple) -> None:
    page, errors = page
    prompt = "Once upon a time"
    # The same request without the page (temperature 0: the same text and step count).
    expected = _completed(dashboard_server, {"prompt": prompt, **FIXED})

    _open(page, dashboard_server)
    assert _form(page) == _as_form(_served_defaults(dashboard_server))
    page.evaluate(RECORDER)
    _throttle(page, 20_000)
    _fill(page, prompt, FIXED)
    page.click("#generate")

    card = page.locator(".card").first
    card.wait_for(timeout=30_000)
    page.wait_for_function(
        "document.querySelector('.card') && document.querySelector('.card').dataset.state"
        " === 'completed'",
        timeout=90_000,
    )
    frames = page.evaluate("window.__frames")
    running = [f for f in frames if f["state"] == "running"]
    steps = sorted({f["step"] for f in running})
    canvases = {f["canvas"] for f in running}
    print(f"\nrendered {len(frames)} frames, steps seen {steps}, {len(canvases)} distinct canvases")
    assert len(steps) >= 3, f"canvas seen at steps {steps} only"
    assert len(canvases) >= 3, "the canvas did not change from step to step"
    masked = [int(f["masked"]) for f in running if f["masked"].isdigit()]
    assert masked == sorted(masked, reverse=True), f"masked count went up: {masked}"

    assert card.locator(".prompt").text_content() == prompt
    assert card.get_attribute("data-step") == str(expected["steps"])
    assert card.locator(".text").evaluate("e => e.classList.contains('final')")
    assert card.locator(".text").evaluate("e => e.textContent") == expected["text"]
    assert (
        card.locator(".state").inner_text()
        == "completed (length)"
        == (f"completed ({expected['finish_reason']})")
    )
    assert expected["steps"] == FIXED["steps"]
    assert card.locator(".masked").inner_text() == "0"
    # The fixed schedule commits max_tokens / steps tokens per forward.
    assert float(card.locator(".tpf").inner_text()) == FIXED["max_tokens"] / FIXED["steps"]

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert errors == [], f"console errors: {errors}"


def _idle_hint(page: object) -> str:
    """What the empty request list shows (its `::before` text; "none" once a card is in)."""
    return page.evaluate("getComputedStyle(document.getElementById('cards'), '::before').content")


def test_idle_page_says_what_will_appear(dashboard_server: str, page: tuple) -> None:
    """A page with no request yet says what will appear and how (Generate, watch all,
    `/?watch`); the hint leaves with the first card. `/?watch` opens it already watching."""
    page, errors = page
    _open(page, dashboard_server)
    hint = _idle_hint(page)
    assert "Generate" in hint and "Watch all" in hint and "?watch" in hint, hint
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-idle.png"), full_page=True)
    _fill(page, "Once upon a time", FIXED)
    page.click("#generate")
    page.locator(".card").first.wait_for(timeout=30_000)
    assert _idle_hint(page) == "none"

    page.goto(dashboard_server + "/?watch")
    page.wait_for_function("document.getElementById('watch-status').textContent !== ''")
    assert page.is_checked("#watch-all")
    assert errors == [], f"console errors: {errors}"


def test_watch_all_keeps_up_with_16_concurrent_requests(dashboard_server: str, page: tuple) -> None:
    page, errors = page
    n = 16
    _watch(page, dashboard_server)
    # The page's longest gap between animation frames while the burst streams in.
    page.evaluate(
        """
        window.__maxGap = 0;
        let last = performance.now();
        const tick = (now) => {
          window.__maxGap = Math.max(window.__maxGap, now - last);
          last = now;
          requestAnimationFrame(tick);
        };
        requestAnimationFrame(tick);
        """
    )
    texts: dict[int, str] = {}

    def one(i: int) -> None:
        body = {"prompt": f"Request number {i}", "max_tokens": 32, "steps": 16, "block_length": 8}
        r = httpx.post(f"{dashboard_server}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        texts[i] = r.json()["choices"][0]["text"]

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    elapsed = time.monotonic() - start
    assert len(texts) == n

    page.wait_for_function(
        f"document.querySelectorAll('.card[data-state=completed]').length >= {n}", timeout=30_000
    )
    max_gap = page.evaluate("window.__maxGap")
    cards = page.locator(".card").count()
    # A round trip into the page answers at once: the main thread is not drowning.
    t0 = time.monotonic()
    page.evaluate("1 + 1")
    roundtrip = time.monotonic() - t0
    print(
        f"\n{n} concurrent requests in {elapsed:.2f} s; {cards} cards; "
        f"longest frame gap {max_gap:.0f} ms; evaluate round trip {roundtrip * 1000:.0f} ms"
    )
    assert cards <= 24
    assert max_gap < 1000, f"the page froze for {max_gap:.0f} ms"
    shown = set(
        page.locator(".card[data-state=completed] .text").evaluate_all(
            "els => els.map(e => e.textContent)"
        )
    )
    assert shown & set(texts.values()), "no finished card shows its request's final text"
    # Strangers' cards show their prompts too (from request.queued on the firehose).
    prompts = page.locator(".card .prompt").evaluate_all("els => els.map(e => e.textContent)")
    assert {f"Request number {i}" for i in range(n)} <= set(prompts)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-watch-all.png"), full_page=False)
    assert errors == [], f"console errors: {errors}"


def test_stop_aborts_the_request(dashboard_server: str, page: tuple) -> None:
    """Stop closes the stream; the server aborts the request (a client disconnect)."""
    page, errors = page

    def disconnects() -> float:
        text = httpx.get(f"{dashboard_server}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("marble_client_disconnects_total"))
        return float(line.split()[-1])

    before = disconnects()
    _open(page, dashboard_server)
    _fill(
        page, "A long one", {"max_tokens": 480, "steps": 480, "block_length": 480, "temperature": 0}
    )
    page.check("#ignore_eos")
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('.card') && +document.querySelector('.card').dataset.step >= 5",
        timeout=30_000,
    )
    page.click("#stop")
    card = page.locator(".card").first
    page.wait_for_function("document.querySelector('.card').dataset.state === 'completed'")
    assert card.locator(".state").inner_text() == "completed (abort)"
    assert int(card.get_attribute("data-step")) < 480
    deadline = time.monotonic() + 30
    while disconnects() <= before:
        assert time.monotonic() < deadline, "the server never counted the disconnect"
        time.sleep(0.1)
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")
    assert errors == [], f"console errors: {errors}"


def test_form_starts_from_the_served_defaults(embedded_server: str, page: tuple) -> None:
    """On the embedded model the form shows its serving defaults (temperature 1, threshold 0.5,
    verify off, token healing), sends exactly them, and the card shows the default prompt:
    Python code."""
    page, errors = page
    defaults = _served_defaults(embedded_server)
    _open(page, embedded_server)
    assert _form(page) == _as_form(defaults)
    prompt = page.input_value("#prompt")
    assert prompt.startswith("def ") and prompt.endswith(":\n"), prompt

    _throttle(page, 20_000)  # slow enough to catch the canvas mid-denoising
    with page.expect_request("**/v1/diffusion/generate") as request:
        page.click("#generate")
    sent = request.value.post_data_json
    assert sent == {"prompt": prompt, **{k: defaults[k] for k in sent if k != "prompt"}}
    assert set(sent) == {"prompt", *SELECT_FIELDS, *NUMBER_FIELDS, *CHECK_FIELDS}

    card = page.locator(".card").first
    card.wait_for(timeout=30_000)
    assert card.locator(".prompt").text_content() == prompt
    page.wait_for_function(
        "+document.querySelector('.card').dataset.step >= 24", polling=50, timeout=60_000
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-embedded.png"), full_page=True)
    page.wait_for_function(
        "document.querySelector('.card').dataset.state === 'completed'", timeout=90_000
    )
    assert card.locator(".prompt").text_content() == prompt
    # Defaults puts back what the server serves after an edit.
    page.fill("#temperature", "0.3")
    page.click("#reset-defaults")
    assert _form(page) == _as_form(defaults)
    assert errors == [], f"console errors: {errors}"


@pytest.fixture(scope="module")
def uniform_server() -> Iterator[str]:
    """Tiny DiffusionGemma: no mask token, every canvas starts as noise."""
    with running_server(REPO.parent / "shared" / "reference" / "diffusiongemma-tiny") as url:
        yield url


def test_a_uniform_state_canvas_shows_positions_changing(uniform_server: str, page: tuple) -> None:
    """A DiffusionGemma card starts as noise, shows accepted and re-noised counts in its header
    and redraws the positions that change, until the text is final."""
    page, errors = page
    _open(page, uniform_server)
    page.evaluate(RECORDER)
    _throttle(page, 4_000)
    page.fill("#prompt", "Why is the sky blue?")
    page.fill("#max_tokens", "48")
    page.fill("#seed", "3")
    page.set_checked("#ignore_eos", True)
    page.click("#generate")
    card = page.locator(".card").first
    card.wait_for(timeout=30_000)
    page.wait_for_function(
        "document.querySelector('.card')"
        " && Number(document.querySelector('.card').dataset.step) >= 3",
        timeout=90_000,
    )
    header = card.locator(".fwd").inner_text()
    assert "accepted" in header and "renoised" in header, header
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-uniform.png"), full_page=True)
    page.wait_for_function(
        "document.querySelector('.card').dataset.state === 'completed'", timeout=90_000
    )
    frames = [f for f in page.evaluate("window.__frames") if f["state"] == "running"]
    assert len({f["canvas"] for f in frames}) >= 3, "the canvas did not change from step to step"
    assert card.locator(".text").evaluate("e => e.classList.contains('final')")
    assert errors == [], f"console errors: {errors}"


@pytest.fixture(scope="module")
def editing_server() -> Iterator[str]:
    """Tiny LLaDA2: block-causal, edits filled tokens (LLaDA2.1's quality mode by default)."""
    with running_server(REPO.parent / "shared" / "reference" / "llada2-tiny") as url:
        yield url


def test_an_edited_position_shows_as_an_edit(editing_server: str, page: tuple) -> None:
    """An LLaDA2 card counts edits in its header and outlines every position a later step
    replaced; the text is final once the request completes."""
    page, errors = page
    _open(page, editing_server)
    page.fill("#prompt", "Solve 12 + 30.")
    page.fill("#max_tokens", "32")
    page.fill("#block_length", "8")
    page.set_checked("#ignore_eos", True)
    page.click("#generate")
    card = page.locator(".card").first
    card.wait_for(timeout=30_000)
    page.wait_for_function(
        "document.querySelector('.card').dataset.state === 'completed'", timeout=90_000
    )
    header = card.locator(".fwd").inner_text()
    edits = int(header.split("edits ")[1].split(" ")[0]) if "edits " in header else 0
    assert edits > 0, header
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-edit.png"), full_page=True)
    assert card.locator(".text").evaluate("e => e.classList.contains('final')")
    assert errors == [], f"console errors: {errors}"


def test_form_offers_and_sends_only_the_models_fields(editing_server: str, page: tuple) -> None:
    """A model's defaults list only the settings it reads: the form greys out the others (an
    LLaDA2 has no steps, cache, remasking, verify or token healing) and leaves them out of the
    request, which the model then serves."""
    page, errors = page
    defaults = _served_defaults(editing_server)
    _open(page, editing_server)
    fields = [*NUMBER_FIELDS, *SELECT_FIELDS, *CHECK_FIELDS]
    unread = [name for name in fields if name not in defaults]
    assert {"steps", "cache", "verify_threshold"} <= set(unread)
    for name in fields:
        assert page.is_disabled(f"#{name}") == (name in unread), name
    page.fill("#max_tokens", "8")
    page.fill("#block_length", "8")
    with page.expect_response("**/v1/diffusion/generate") as response:
        page.click("#generate")
    sent = response.value.request.post_data_json
    assert response.value.status == 200
    assert set(sent) == {"prompt", *(name for name in fields if name in defaults)}
    page.wait_for_function(
        "document.querySelector('.card') && "
        "document.querySelector('.card').dataset.state === 'completed'",
        timeout=90_000,
    )
    assert errors == [], f"console errors: {errors}"


@pytest.fixture(scope="module")
def sdar_server() -> Iterator[str]:
    """Tiny SDAR: block-causal, each block's text settles once the block is stored."""
    with running_server(REPO.parent / "shared" / "reference" / "sdar-tiny") as url:
        yield url


def test_an_sdar_request_resolves_block_by_block(sdar_server: str, page: tuple) -> None:
    """An SDAR card starts from its serving defaults (4 steps per block of 4, threshold 0.9),
    steps through its prefill, denoising and store forwards, and ends with the same text and
    step count as the same request without the page."""
    page, errors = page
    defaults = _served_defaults(sdar_server)
    _open(page, sdar_server)
    shown = _form(page)
    for name, value in _as_form({**dict.fromkeys(shown), **defaults}).items():
        assert page.is_disabled(f"#{name}") == (name not in defaults), name
        if name in defaults:
            assert shown[name] == value, name
    page.evaluate(RECORDER)
    _throttle(page, 4_000)
    page.fill("#prompt", "Why is the sky blue?")
    page.fill("#max_tokens", "32")
    page.set_checked("#ignore_eos", True)
    with page.expect_request("**/v1/diffusion/generate") as request:
        page.click("#generate")
    sent = request.value.post_data_json
    assert (sent["steps"], sent["block_length"], sent["threshold"]) == (4, 4, 0.9)
    card = page.locator(".card").first
    card.wait_for(timeout=30_000)
    page.wait_for_function(
        "document.querySelector('.card').dataset.state === 'completed'", timeout=90_000
    )
    # The same request, computing its prompt as the page's did (not from the prefix cache the
    # page's request filled).
    expected = _completed(sdar_server, {**sent, "prefix_cache": False})
    frames = [f for f in page.evaluate("window.__frames") if f["state"] == "running"]
    assert len({f["step"] for f in frames}) >= 3, "the card did not show the steps"
    assert card.get_attribute("data-step") == str(expected["steps"])
    assert card.locator(".text").evaluate("e => e.textContent") == expected["text"]
    assert card.locator(".text").evaluate("e => e.classList.contains('final')")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-sdar.png"), full_page=True)
    assert errors == [], f"console errors: {errors}"


def test_a_prompt_from_the_prefix_cache_is_counted_in_the_card(
    sdar_server: str, page: tuple
) -> None:
    """A request whose prompt blocks another request left in the prefix cache says, in its
    card's header, how many prompt positions it took from there."""
    page, errors = page
    _watch(page, sdar_server)
    body = {"prompt": "A shared system prompt, long enough for blocks. " * 2, "max_tokens": 8}
    for _ in range(2):
        _completed(sdar_server, body)
    page.wait_for_function(
        "document.querySelectorAll('.card[data-state=completed]').length >= 2", timeout=30_000
    )
    header = page.locator(".card").first.locator(".fwd").inner_text()
    assert "prompt cached" in header, header
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-prefix-cache.png"), full_page=True)
    assert errors == [], f"console errors: {errors}"


def test_a_constrained_request_shows_what_its_grammar_rejected(
    dashboard_server: str, page: tuple
) -> None:
    """A structured-output request sent by another client appears on the watching page with
    the proposals its grammar turned away counted in its header; its text is the JSON."""
    page, errors = page
    _watch(page, dashboard_server)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
    }
    body = {"prompt": "A record:", "max_tokens": 48, "threshold": 0.5, "guided_json": schema}
    r = httpx.post(f"{dashboard_server}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    text = r.json()["choices"][0]["text"]
    assert json.loads(text)["ok"] in (True, False)
    page.wait_for_function(
        "document.querySelectorAll('.card[data-state=completed]').length >= 1", timeout=30_000
    )
    header = page.locator(".card").first.locator(".fwd").inner_text()
    assert "grammar rejected" in header, header
    assert page.locator(".card .text").first.inner_text() == text
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-structured.png"), full_page=True)
    assert errors == [], f"console errors: {errors}"
