"""The chat page in a real headless Chromium (Debian's chromium + chromium-driver, selenium).

Skipped with the reason when the browser or its driver is not installed (`.ci/run`
installs both). Nothing is downloaded: selenium is given the system chromedriver.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import RunningServer, free_port, make_config, scrape

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
CHAT_MODEL = "chat-generator"
REPLY_ROOM = 30_000  # max_new_tokens of the chat model, asked for in full by the long reply


@pytest.fixture(scope="module")
def page_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: Path
) -> Iterator[RunningServer]:
    """tiny-classifier plus a tiny LM with room for 30,000 tokens and no EOS, so a reply is
    still streaming when the test presses Stop. 8,000 were not enough: a loaded 2-core CI
    box streamed all of them (467 tokens/s) before the test reached Stop; the static KV
    cache of 30,464 positions also makes each step dearer, so the end is minutes away."""
    from headrace.build.tiny import make_tiny_generator

    root = tmp_path_factory.mktemp("page-models")
    shutil.copytree(tiny_models / "tiny-classifier", root / "tiny-classifier")
    make_tiny_generator(root / CHAT_MODEL / "1", max_context=REPLY_ROOM + 464)
    path = root / CHAT_MODEL / "1" / "headrace.json"
    manifest = json.loads(path.read_text())
    manifest["limits"].update(max_input_tokens=256, max_new_tokens=REPLY_ROOM)
    manifest["generation"]["eos_token_id"] = None
    path.write_text(json.dumps(manifest))
    running = RunningServer(make_config(root, http_port=free_port()))
    yield running
    running.stop()


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium manager: never fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=420,900", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def slots(running: RunningServer) -> float | None:
    return scrape(f"{running.http_url}/metrics", "headrace_active_slots", {"model": CHAT_MODEL})


def test_chat_page_streams_stops_and_classifies(
    browser: object, page_server: RunningServer, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver: object = browser
    wait = WebDriverWait(driver, 20, poll_frequency=0.02)  # type: ignore[arg-type]
    find = driver.find_element  # type: ignore[attr-defined]
    driver.get(page_server.http_url + "/")  # type: ignore[attr-defined]
    wait.until(lambda d: find(By.CSS_SELECTOR, "#model option"))
    assert find(By.ID, "model").get_attribute("value") == CHAT_MODEL
    assert "1 generate, 1 classify" in find(By.ID, "status").text

    # A long reply streams in: its text grows while the Stop button is live.
    find(By.CSS_SELECTOR, "#settings summary").click()
    max_tokens = find(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(REPLY_ROOM))
    find(By.ID, "prompt").send_keys("hello there")
    find(By.ID, "send").click()
    sent = time.monotonic()
    reply = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant .text")))
    wait.until(lambda d: len(reply.text) > 0)
    first = len(reply.text)
    wait.until(lambda d: len(reply.text) > first + 5)
    assert find(By.ID, "stop").is_enabled()
    assert slots(page_server) == 1
    streamed = len(reply.text)

    # Stop aborts the fetch; the server frees the slot at its next step.
    stopped = time.monotonic()
    find(By.ID, "stop").click()
    stats = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant .stats")))
    took = f"Stop pressed {stopped - sent:.1f} s after Send"
    assert "stopped" in stats.text and "TTFT" in stats.text and "tok/s" in stats.text, took
    deadline = time.monotonic() + 5
    while slots(page_server) != 0:
        assert time.monotonic() < deadline, "the slot was not freed after Stop"
        time.sleep(0.02)
    assert not find(By.ID, "stop").is_enabled()
    assert len(reply.text) >= streamed

    # The conversation goes on: a second turn, both kept on the page.
    max_tokens.clear()
    max_tokens.send_keys("8")
    find(By.ID, "prompt").send_keys("and now?")
    find(By.ID, "send").click()
    wait.until(lambda d: len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")) == 2)  # type: ignore[attr-defined]
    assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2  # type: ignore[attr-defined]
    last = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")[-1].text  # type: ignore[attr-defined]
    assert "8 tokens" in last and "length" in last

    # The classify box.
    find(By.ID, "classify-text").send_keys("what a lovely day")
    find(By.ID, "classify-go").click()
    wait.until(lambda d: len(driver.find_elements(By.CSS_SELECTOR, "#classify-out .bar")) == 3)  # type: ignore[attr-defined]
    names = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#classify-out .name")}  # type: ignore[attr-defined]
    assert names == {"negative", "neutral", "positive"}

    shot = tmp_path / "chat-page.png"
    assert driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.stat().st_size > 10_000
