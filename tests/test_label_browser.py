"""The labelling page in a real browser: Debian's headless Chromium driven by Selenium.

``.ci/run`` installs ``chromium`` and ``chromium-driver`` when they are missing; without them
this test skips and says so.
"""

from __future__ import annotations

import shutil
import threading

import pytest
from werkzeug.serving import make_server

from shraygpt_rl.data.labels import Item, LabelStore, read_records
from shraygpt_rl.label import create_app

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def served(tmp_path):
    items = [Item("Which is right?\n<b>2 + 2</b>", HOSTILE, "4")] + [
        Item(f"What is {i} + {i}?", str(2 * i), str(2 * i + 1)) for i in range(1, 4)
    ]
    store = LabelStore(items, tmp_path / "prefs.jsonl", seed=1)
    server = make_server("127.0.0.1", 0, create_app(store), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", store
    server.shutdown()


def _wait_for(driver, css: str, text: str, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_element("css selector", css).text == text)


def sign_in(browser, url: str, name: str) -> None:
    """Open the page and give the name it asks for once (kept in the browser)."""
    browser.get(url)
    field = browser.find_element("css selector", "#name")
    field.send_keys(name)
    browser.find_element("css selector", "#name-form button").click()


def test_click_key_undo_and_reload_in_chromium(browser, served, tmp_path):
    url, store = served
    sign_in(browser, url, "Ann Lee")
    _wait_for(browser, "#progress", "0 / 4")

    # The hostile answer is shown as its literal characters; nothing in it ran or became markup.
    shown = (
        browser.find_element("css selector", "#answer-a").text + browser.find_element("css selector", "#answer-b").text
    )
    assert HOSTILE in shown and "<b>2 + 2</b>" in browser.find_element("css selector", "#prompt").text
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_elements("css selector", ".answer img, .answer script, #prompt b") == []
    browser.save_screenshot(str(tmp_path / "page.png"))

    first = browser.execute_script("return current.id")
    browser.find_element("css selector", 'button[data-choice="A+"]').click()  # a click
    _wait_for(browser, "#progress", "1 / 4")
    second = browser.execute_script("return current.id")
    browser.find_element("css selector", "#note").send_keys("close call")
    browser.find_element("css selector", "body").click()  # leave the note box: keys are grades again
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).send_keys("5").perform()  # a key: B is significantly better
    _wait_for(browser, "#progress", "2 / 4")
    ActionChains(browser).send_keys("u").perform()  # undo it
    _wait_for(browser, "#progress", "1 / 4")
    assert browser.execute_script("return current.id") == second

    browser.refresh()  # a reload shows the same state: the same item, the same progress, no name asked
    _wait_for(browser, "#progress", "1 / 4")
    assert browser.execute_script("return current.id") == second
    assert not browser.find_element("css selector", "#name-form").is_displayed()

    records = read_records(tmp_path / "prefs.jsonl")
    assert [(r["type"], r.get("choice")) for r in records] == [
        ("judgement", "A+"),
        ("judgement", "B++"),
        ("retraction", None),
    ]
    assert records[0]["item"] == first and records[1]["item"] == second and records[2]["retracts"] == records[1]["id"]
    assert records[1]["note"] == "close call" and records[1]["strength"] == 2
    assert {r["labeller"] for r in records} == {"Ann Lee"}
    item = store.by_id[first]
    a = item.response_a if records[0]["shown"] == "ab" else item.response_b
    assert records[0]["chosen"] == a
