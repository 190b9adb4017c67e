"""How fast the labelling page answers a keyboard, with several labellers per pair: ``n`` pairs
judged ``k`` times each (``--judgements_per_pair k``) by ``k`` labellers, each in their own
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium), taking
turns, each key waiting for that page's next item to show. A person's reading time is not in it:
this is the page's own cost per judgement (the server's lock, the fsync, the page's update)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from werkzeug.serving import make_server

from shraygpt_rl.data.labels import Item, LabelStore, read_records
from shraygpt_rl.label import create_app


def _browser(webdriver, chromium: str, driver_path: str, profile: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--disable-background-networking")
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def bench_label(pairs: int = 20, judgements_per_pair: int = 3) -> dict[str, float] | None:
    """Seconds to judge ``pairs`` arithmetic pairs ``judgements_per_pair`` times by keyboard;
    None (said why) without a browser."""
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
    store = LabelStore(items, folder / "prefs.jsonl", judgements_per_pair=judgements_per_pair)
    server = make_server("127.0.0.1", 0, create_app(store), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    names = [f"labeller-{n + 1}" for n in range(judgements_per_pair)]
    browsers = {}
    try:
        for name in names:
            browsers[name] = browser = _browser(webdriver, chromium, driver_path, folder / name)
            browser.get(f"http://127.0.0.1:{server.server_port}/")
            browser.execute_script("localStorage.setItem('labeller-name', arguments[0]); location.reload()", name)
            WebDriverWait(browser, 10).until(lambda b: b.execute_script("return current !== null"))
        start, judged, open_pages = time.perf_counter(), 0, dict(browsers)
        while open_pages:
            for name, browser in list(open_pages.items()):
                shown = browser.execute_script("return current && current.id")
                if shown is None:
                    del open_pages[name]
                    continue
                ActionChains(browser).send_keys("12345"[judged % 5]).perform()
                WebDriverWait(browser, 10, poll_frequency=0.002).until(  # the default polls every 0.5 s
                    lambda b, s=shown: b.execute_script("return current === null || current.id !== arguments[0]", s)
                )
                judged += 1
        seconds = time.perf_counter() - start
    finally:
        for browser in browsers.values():
            browser.quit()
        server.shutdown()
    stored = len(read_records(folder / "prefs.jsonl"))
    print(
        f"label: {pairs} pairs x {judgements_per_pair} judgements by {len(names)} labellers (keyboard, headless "
        f"Chromium) in {seconds:.2f} s: {seconds / judged * 1e3:.0f} ms per judgement; {stored} judgements stored"
    )
    return {"seconds": seconds, "judgements": judged, "stored": stored}
