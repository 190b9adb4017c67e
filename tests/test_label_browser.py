"""The labelling page in a real browser: Debian's headless Chromium driven by Selenium.

``.ci/run`` installs ``chromium`` and ``chromium-driver`` when they are missing; without them
this test skips and says so.
"""

from __future__ import annotations

import shutil
import threading

import pytest
from werkzeug.serving import make_server

from shraygpt_rl.bench import ROOT
from shraygpt_rl.data.labels import Item, LabelStore, read_records
from shraygpt_rl.label import create_app

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def open_browser(profile):
    """A headless Chromium with its own profile (its own localStorage: its own labeller)."""
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
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.implicitly_wait(0)
    return driver


@pytest.fixture
def browser(tmp_path):
    driver = open_browser(tmp_path / "chromium")
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


def test_an_old_random_id_and_not_you_ask_for_a_name(browser, served):
    url, store = served
    browser.get(url)  # a browser that used the page before names, with its random id kept
    browser.execute_script("localStorage.setItem('labeller', 'k2j4x9')")
    browser.refresh()
    assert browser.find_element("css selector", "#name-form").is_displayed()  # asked for a name all the same
    sign_in(browser, url, "Someone Else")
    _wait_for(browser, "#progress", "0 / 4")
    assert browser.find_element("css selector", "#who").text.startswith("Someone Else")
    browser.find_element("css selector", "#rename").click()  # "not you?": the name is asked again
    assert browser.find_element("css selector", "#name-form").is_displayed()
    assert not browser.find_element("css selector", "#work").is_displayed()


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


def _pairs(n: int, seed: int = 0) -> tuple[list[Item], dict[str, str]]:
    """``n`` arithmetic pairs, one answer right and one off by ten, the right one's side drawn;
    and each pair's known better answer (``a`` or ``b``)."""
    import random

    rng, items, truth = random.Random(seed), [], {}
    for _ in range(n):
        x, y = rng.randrange(10, 90), rng.randrange(10, 90)
        right, wrong = f"Answer: {x + y}", f"Answer: {x + y + 10}"
        item = Item(f"What is {x} + {y}?", *((right, wrong) if rng.random() < 0.5 else (wrong, right)))
        items.append(item)
        truth[item.id] = "a" if item.response_a == right else "b"
    return items, truth


def test_three_labellers_in_three_browsers_judge_every_pair_three_times(tmp_path, random_policy, monkeypatch):
    """Seed 004's several evaluators per comparison, K = 3: three people, each at their own page,
    judge the same 20 pairs. Alice agrees with the known answers, Bob is noisy (right three times
    in four, by a slight grade), Carol presses keys at random. Every pair gets exactly three
    judgements from three names; Carol agrees with the others least; the report's alpha equals a
    hand computation on the same judgements; the aggregated file trains the reward model and DPO."""
    import random

    from conftest import naive_ordinal_alpha
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    from shraygpt_rl.cli import main as train
    from shraygpt_rl.data.agreement import grade

    items, truth = _pairs(20)
    store = LabelStore(items, tmp_path / "prefs.jsonl", seed=1, judgements_per_pair=3)
    guide = {"question": "Which answer is right?", "criteria": ["accuracy", "clarity"]}
    server = make_server("127.0.0.1", 0, create_app(store, guide=guide), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    rng = random.Random(0)

    def alice(side):
        return "1" if side == "a" else "5"

    def bob(side):
        return ("2" if side == "a" else "4") if rng.random() < 0.75 else ("4" if side == "a" else "2")

    def carol(side):
        return rng.choice("12345")

    people = {"Alice": alice, "Bob 李": bob, "Carol": carol}  # a header carries Latin-1: the page encodes
    browsers = {name: open_browser(tmp_path / name) for name in people}
    try:
        for name, driver in browsers.items():
            sign_in(driver, url, name)
            WebDriverWait(driver, 10).until(lambda d: d.execute_script("return current !== null"))
        assert browsers["Alice"].find_element("css selector", "#question").text == "Which answer is right?"
        open_pages = dict(browsers)
        while open_pages:  # one key per person in turn, as three people at their desks would
            for name, driver in list(open_pages.items()):
                shown = driver.execute_script("return current")
                if shown is None:
                    del open_pages[name]
                    continue
                item = store.by_id[shown["id"]]
                better_on_screen = truth[item.id] if store.order(item) == "ab" else {"a": "b", "b": "a"}[truth[item.id]]
                ActionChains(driver).send_keys(people[name](better_on_screen)).perform()
                WebDriverWait(driver, 10).until(
                    lambda d, before=shown["id"]: d.execute_script(
                        "return current === null || current.id !== arguments[0]", before
                    )
                )
        stats_page = browsers["Alice"]
        stats_page.get(url + "stats")
        shown_alpha = stats_page.find_element("css selector", "#alpha").text
    finally:
        for driver in browsers.values():
            driver.quit()
        server.shutdown()

    records = read_records(tmp_path / "prefs.jsonl")
    by_item = {}
    for r in records:
        by_item.setdefault(r["item"], []).append(r["labeller"])
    assert set(by_item) == {i.id for i in items}
    assert all(sorted(names) == sorted(people) for names in by_item.values())

    monkeypatch.chdir(tmp_path)
    figures = train(["--stage", "label_report", "--judgements", "prefs.jsonl"])
    agreement = {name: figures["labellers"][name]["agreement_with_majority"] for name in people}
    assert agreement["Carol"] < min(agreement["Alice"], agreement["Bob 李"]), agreement
    table = [[None] * len(items) for _ in people]  # labellers x pairs, grades + 3 (1-5)
    for r in records:
        table[list(people).index(r["labeller"])][[i.id for i in items].index(r["item"])] = grade(r) + 3
    assert figures["krippendorff_alpha_ordinal"] == pytest.approx(naive_ordinal_alpha(table), rel=1e-9)
    assert shown_alpha == f"{figures['krippendorff_alpha_ordinal']:.3f}"

    kept = figures["pairs_kept"]
    assert kept >= 15  # Alice and Bob agree on at least 15 of 20 (Bob errs 1 in 4)
    pairs = "prefs.jsonl.preferences.jsonl"
    small = ["--data.val_size", "2", "--data.test_size", "2", "--data.batch_size", "4", "--trainer.max_steps", "2"]
    small += [
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "1",
        "--model.policy",
        random_policy,
    ]
    reward_args = ["--config", str(ROOT / "configs" / "reward.yaml"), "--model.margin_from_strength", "true"]
    reward = train(
        ["--stage", "reward", *reward_args, "--data.source", pairs, *small, "--model.export_path", "rm.ckpt"]
    )
    assert len(reward.datamodule.splits["train"]) == kept - 4 and (tmp_path / "rm.ckpt").is_file()
    dpo_args = ["--config", str(ROOT / "configs" / "dpo.yaml"), "--data.source", pairs, *small]
    dpo = train(["--stage", "dpo", *dpo_args, "--model.export_path", "dpo.ckpt"])
    assert dpo.trainer.global_step == 2 and (tmp_path / "dpo.ckpt").is_file()
