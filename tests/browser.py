"""Headless Chromium checks shared by the report tests: the page loads with every figure, no console
errors and no network access, and a full-page screenshot is taken."""

import base64
import json
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install -y chromium chromium-driver)",
)


def render_in_chromium(page: Path, tmp_path: Path, figures: list[str], on_page=None) -> Path:
    """Load ``page`` in headless Chromium, assert it is whole, and return the path of a screenshot PNG;
    ``on_page(driver)`` runs more checks on the loaded page (1280×900 window) before the screenshot."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # console + network events
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.as_uri())
        driver.execute_script("return document.fonts.ready")
        assert driver.title.startswith("tiltlm report")
        images = driver.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.alt])")
        assert [i[0] for i in images] == figures
        assert all(complete and width > 0 and alt for _, complete, width, alt in images), images
        events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
        assert {Path(u).name for u in requested} >= {"report.html", *(Path(f).name for f in figures)}
        assert not [u for u in requested if u.split(":")[0] in ("http", "https", "ws", "wss")], requested  # nothing from the network
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        if on_page is not None:
            on_page(driver)
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    finally:
        driver.quit()
    path = tmp_path / "screenshot.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path
