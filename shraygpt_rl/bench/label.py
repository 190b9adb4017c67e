"""How fast the labelling page answers a keyboard: ``n`` pairs judged by keys 1-5 in headless
Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium), each key waiting
for the next item to show. A person's reading time is not in it: this is the page's own cost."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from werkzeug.serving import make_server

from shraygpt_rl.data.labels import Item, LabelStore, read_records
from shraygpt_rl.label import create_app


def bench_label(pairs: int = 20) -> dict[str, float] | None:
    """Seconds to judge ``pairs`` arithmetic pairs by keyboard; None (said why) without a browser."""
    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        chromium = None
    if not (chromium and driver_path):
        print("label: needs selenium and Debian's chromium and chromium-driver; not measured here")
        return None
    folder = Path(tempfile.mkdtemp(prefix="shraygpt-label-"))
    items = [
        Item(f"User: What is {a} + {b}?\n\nAssistant:", f" {a + b}", f" {a + b + 10}")
        for a, b in zip(range(11, 11 + pairs), range(40, 40 + pairs))
    ]
    store = LabelStore(items, folder / "prefs.jsonl")
    server = make_server("127.0.0.1", 0, create_app(store), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        f"--user-data-dir={folder / 'chromium'}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")

        def progress(n: int):
            WebDriverWait(browser, 10).until(
                lambda b: b.find_element("css selector", "#progress").text == f"{n} / {pairs}"
            )

        progress(0)
        start = time.perf_counter()
        for n in range(1, pairs + 1):
            ActionChains(browser).send_keys("12345"[n % 5]).perform()
            progress(n)
        seconds = time.perf_counter() - start
    finally:
        browser.quit()
        server.shutdown()
    stored = len(read_records(folder / "prefs.jsonl"))
    print(
        f"label: {pairs} pairs judged by keyboard in headless Chromium in {seconds:.2f} s "
        f"({seconds / pairs * 1e3:.0f} ms per pair); {stored} judgements stored"
    )
    return {"seconds": seconds, "stored": stored}
