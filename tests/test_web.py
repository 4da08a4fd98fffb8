"""The upload page at `/`, `/docs` and `/redoc` in a real headless browser (Debian's chromium
driven by Playwright) against the real service (`stemseg serve` + `stemseg worker`, the shipped
model, the sample video), with every request off this machine refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from service_env import ServiceEnv

pytestmark = pytest.mark.timeout(600) if hasattr(pytest.mark, "timeout") else []
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.mp4"
KEY = "web-test-key"
# Set to write the screenshots into docs/ (how docs/web-page*.png are made).
WRITE_SCREENSHOTS = os.environ.get("STEMSEG_WRITE_SCREENSHOTS") == "1"


def _chromium() -> str:
    path = os.environ.get("STEMSEG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on this machine (apt-get install -y chromium, or set STEMSEG_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, lite_weights: Path):
    env = ServiceEnv(tmp_path_factory.mktemp("web"), lite_weights, STEMSEG_API_KEYS=KEY)
    env.start_api()
    env.start_worker()
    yield env
    env.close()


def _page(browser, service: ServiceEnv, **context):
    """A page that may load only from the service: any other host is refused and recorded."""
    ctx = browser.new_context(**context)
    page = ctx.new_page()
    page.outside, page.errors = [], []
    local = urlsplit(service.base).netloc

    def route(r) -> None:
        url = urlsplit(r.request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.netloc != local:
            page.outside.append(r.request.url)
            r.abort()
        else:
            r.continue_()

    page.route("**/*", route)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    # Chromium logs every 4xx as a console error: the page shows those itself (checked by the tests).
    page.on("console", lambda m: page.errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    return ctx, page


def test_upload_follow_play_select_download(browser, service: ServiceEnv, tmp_path: Path) -> None:
    ctx, page = _page(browser, service, viewport={"width": 1100, "height": 900}, accept_downloads=True)
    page.goto(service.base + "/")
    # Every control is labelled.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, button, video, progress')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.outerHTML)""")
    assert unlabelled == []
    # Without a key the job list shows the service's 401 problem text.
    page.wait_for_selector("#error:not([hidden])")
    assert "a valid API key is required" in page.inner_text("#error")

    # The key, by keyboard: focus the field, type, Enter; kept in sessionStorage.
    page.focus("#api-key")
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#key-state').textContent === 'key in use'")
    assert page.evaluate("sessionStorage.getItem('stemseg-api-key')") == KEY
    page.wait_for_selector("#error", state="hidden")

    page.set_input_files("#file", str(SAMPLE))
    page.focus("#upload-button")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#job-status').textContent === 'succeeded'", timeout=240_000)
    job_id = page.inner_text("#job-id")
    job = httpx.get(f"{service.base}/v1/jobs/{job_id}", headers={"X-API-Key": KEY}).json()
    assert job["status"] == "succeeded"
    assert page.evaluate("document.querySelector('#upload-progress').value") == 1
    page.wait_for_function("document.querySelector('#process-progress').value === 1")
    assert page.inner_text("#process-text") == "48 of 48 frames"
    assert "synthetic shapes" in page.inner_text("#job-warning")  # the shipped model says what it is

    # The track table is the API's result.
    page.wait_for_selector("#tracks tbody tr[data-index]")
    rows = page.eval_on_selector_all("#tracks tbody tr[data-index]",
                                     "rows => rows.map(r => [...r.cells].slice(0, 5).map(c => c.textContent))")
    result = httpx.get(f"{service.base}/v1/jobs/{job_id}/result", headers={"X-API-Key": KEY}).json()
    expected = []
    for t in result["tracks"]:
        present = [i for i, rle in enumerate(t["segmentations"]) if rle]
        expected.append([str(t["id"]), t["category"], f"{t['score']:.3f}", str(present[0]), str(present[-1])])
    assert rows == expected and len(rows) == job["tracks"] == 10

    # The overlay plays.
    page.wait_for_function("document.querySelector('#overlay').readyState >= 2")
    page.evaluate("document.querySelector('#overlay').play()")
    page.wait_for_function("document.querySelector('#overlay').currentTime > 0.3", timeout=30_000)
    assert page.evaluate("document.querySelector('#overlay').videoWidth") == job["video"]["width"]

    # A track selected by keyboard is marked in the table and outlined over the player at its first frame.
    page.evaluate("document.querySelector('#overlay').pause()")
    page.focus("#tracks tbody tr[data-index='2'] button")
    page.keyboard.press("Space")
    assert page.get_attribute("#tracks tbody tr[data-index='2']", "aria-selected") == "true"
    assert page.get_attribute("#tracks tbody tr[data-index='2'] button", "aria-pressed") == "true"
    first = int(expected[2][3])
    fps = job["video"]["fps"]
    page.wait_for_function(f"Math.floor(document.querySelector('#overlay').currentTime * {fps}) === {first}")
    page.wait_for_function("""() => { const c = document.querySelector('#highlight');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false; }""")

    # Downloads: one per format asked for, the same bytes as the API's files.
    labels = page.eval_on_selector_all("#downloads button", "bs => bs.map(b => b.dataset.format)")
    assert labels == job["options"]["formats"] == ["ytvis", "davis", "mots", "overlay"]
    with page.expect_download() as download:
        page.click("#downloads button[data-format=mots]")
    saved = tmp_path / "mots.txt"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "mots.txt"
    assert saved.read_bytes() == httpx.get(f"{service.base}/v1/jobs/{job_id}/files/mots.txt",
                                           headers={"X-API-Key": KEY}).content

    # This key's jobs.
    page.click("#refresh-jobs")
    page.wait_for_function(f"""() => {{ const row = document.querySelector("#jobs tbody tr[data-id='{job_id}']");
        return row && row.cells[2].textContent === 'succeeded' && row.cells[3].textContent === '10'; }}""")

    shot = page.screenshot(full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    if WRITE_SCREENSHOTS:
        (ROOT / "docs" / "web-page.png").write_bytes(shot)

    # An upload the service refuses shows its problem+json text.
    bad = tmp_path / "notes.mp4"
    bad.write_bytes(b"these are notes, not a video" * 50)
    page.set_input_files("#file", str(bad))
    page.click("#upload-button")
    page.wait_for_selector("#error:not([hidden])")
    refused = httpx.post(f"{service.base}/v1/jobs", content=bad.read_bytes(),
                         headers={"X-API-Key": KEY, "Content-Type": "video/mp4"}).json()
    assert page.inner_text("#error").strip() == f"{refused['title']}: {refused['detail']}"

    # The key lives in this tab's session only: a reload keeps it, a new context has none.
    page.reload()
    assert page.input_value("#api-key") == KEY
    assert page.outside == [] and page.errors == [], (page.outside, page.errors)
    ctx.close()
    ctx, page = _page(browser, service)
    page.goto(service.base + "/")
    assert page.input_value("#api-key") == ""
    ctx.close()


# What sticks out of a phone-wide page (a table may be wider: its .scroll box scrolls it).
_OVERFLOWING = """() => [...document.querySelectorAll('*')]
    .filter(e => e.getBoundingClientRect().right > 390.5 || (e.scrollWidth > 390 && !e.matches('.scroll')))
    .filter(e => !e.parentElement || !e.parentElement.closest('.scroll'))
    .map(e => `${e.tagName.toLowerCase()}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`)"""


def test_phone_sized_layout(browser, service: ServiceEnv) -> None:
    with SAMPLE.open("rb") as f:  # a finished job of this key to open
        job = httpx.post(f"{service.base}/v1/jobs", content=f.read(), headers={"X-API-Key": KEY,
                         "Content-Type": "video/mp4", "X-Filename": "a-long-file-name-from-a-phone-camera.mp4"}).json()
    assert service.wait(job["id"], headers={"X-API-Key": KEY})["status"] == "succeeded"
    ctx, page = _page(browser, service, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto(service.base + "/")
    page.evaluate(f"sessionStorage.setItem('stemseg-api-key', '{KEY}')")
    page.reload()
    page.wait_for_selector("#jobs tbody tr")
    # Nothing wider than the screen but the tables' own scroll boxes.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, page.evaluate(_OVERFLOWING)
    for selector in ("#api-key", "#file", "#upload-button", "#refresh-jobs"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    page.locator(f"#jobs tbody tr[data-id='{job['id']}'] button", has_text="Open").click()
    page.wait_for_function("document.querySelector('#job-status').textContent === 'succeeded'")
    page.wait_for_selector("#tracks tbody tr[data-index]")
    page.wait_for_function("document.querySelector('#overlay').readyState >= 2")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, page.evaluate(_OVERFLOWING)
    if WRITE_SCREENSHOTS:
        page.screenshot(path=str(ROOT / "docs" / "web-page-phone.png"), full_page=True)
    assert page.outside == [] and page.errors == [], (page.outside, page.errors)
    ctx.close()


@pytest.mark.parametrize("path, ready", [
    ("/docs", ".swagger-ui .opblock-tag"),
    ("/redoc", "h1 >> text=stemseg-serve"),
])
def test_api_docs_render_offline(browser, service: ServiceEnv, path: str, ready: str) -> None:
    ctx, page = _page(browser, service)
    page.goto(service.base + path)
    page.wait_for_selector(ready, timeout=60_000)
    if path == "/docs":  # the API-key schemes are offered
        page.click("button.authorize")
        page.wait_for_selector("text=X-API-Key")
    assert page.outside == [], page.outside
    ctx.close()
