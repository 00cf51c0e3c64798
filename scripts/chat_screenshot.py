"""Screenshot of the chat page on real models, for the README (docs/chat-page.png).

    python scripts/chat_screenshot.py --models models --out docs/chat-page.png

Starts `headrace serve --http-port` on the repository, drives Debian's Chromium
(chromium + chromium-driver, headless, offline) through one chat turn and one
classification, and saves the window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"headrace serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("docs/chat-page.png"))
    p.add_argument(
        "--message",
        action="append",
        help="a chat turn (repeatable; default: two turns about the day and the weekend)",
    )
    p.add_argument("--classify", default="I love my new phone, the battery lasts all day")
    p.add_argument("--size", default="1000,1100", help="window width,height in CSS pixels")
    a = p.parse_args()
    turns = a.message or ["good morning! what are you up to today?", "any plans for the weekend?"]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    http_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "headrace.server", "serve", "--models", str(a.models),
         "--port", str(free_port()), "--http-port", str(http_port), "--log-level", "warning"],
    )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    profile = tempfile.mkdtemp(prefix="chat-shot-")
    try:
        wait_ready(f"{base}/health/ready", server)
        os.environ.setdefault("SE_OFFLINE", "true")
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--hide-scrollbars",
                     f"--window-size={a.size}", f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(flag)
        service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
        driver = webdriver.Chrome(service=service, options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(base + "/")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            for n, turn in enumerate(turns, 1):
                driver.find_element(By.ID, "prompt").send_keys(turn)
                driver.find_element(By.ID, "send").click()
                wait.until(
                    lambda d, n=n: (
                        len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")) == n
                    )
                )
            driver.find_element(By.ID, "classify-text").send_keys(a.classify)
            driver.find_element(By.ID, "classify-go").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#classify-out .bar"))
            driver.execute_script("window.scrollTo(0, 0)")
            a.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(a.out))
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(profile, ignore_errors=True)
    print(a.out)


if __name__ == "__main__":
    main()
