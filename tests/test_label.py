"""The labelling server: next item, judge, undo, resume, tokens, concurrency, bad requests, escaping."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import RobotLabellers, fails
from werkzeug.serving import make_server

from shraygpt_rl.bench import ROOT
from shraygpt_rl.data.labels import Item, LabelStore, active_judgements, read_records, write_items
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.label import PAGE, create_app, load_items

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def _items(n: int = 5) -> list[Item]:
    return [Item(f"What is {i} + {i}?", f"{2 * i}", f"{2 * i + 1}") for i in range(n)]


def _client(tmp_path, items=None, token=None, **options):
    store = LabelStore(items or _items(), tmp_path / "prefs.jsonl", **options)
    return create_app(store, token).test_client(), store


def _get(client, who="ann", **headers):
    response = client.get("/api/state", headers={"X-Labeller": who, **headers})
    return response.status_code, response.get_json()


def _judge(client, item, choice, who="ann", note=""):
    response = client.post(
        "/api/judge", json={"item": item, "choice": choice, "note": note}, headers={"X-Labeller": who}
    )
    return response.status_code, response.get_json()


def test_the_page_has_the_five_grades_skip_undo_and_progress():
    for choice in ("A++", "A+", "=", "B+", "B++", "skip"):
        assert f'data-choice="{choice}"' in PAGE
    assert 'id="undo"' in PAGE and 'id="progress"' in PAGE and 'id="note"' in PAGE
    assert "innerHTML" not in PAGE.split("<script>")[1].replace("never innerHTML", "")  # answers go in as text


def test_next_item_judge_and_progress(tmp_path):
    client, store = _client(tmp_path)
    status, state = _get(client)
    assert status == 200 and state["done"] == 0 and state["total"] == 5
    first = state["item"]
    item = store.by_id[first["id"]]
    assert {first["a"], first["b"]} == {item.response_a, item.response_b} and first["prompt"] == item.prompt
    status, after = _judge(client, first["id"], "A++", note="clear")
    assert status == 200 and after["done"] == 1 and after["item"]["id"] != first["id"]
    (record,) = read_records(tmp_path / "prefs.jsonl")
    assert record["type"] == "judgement" and record["choice"] == "A++" and record["strength"] == 2
    assert record["chosen"] == first["a"] and record["rejected"] == first["b"] and record["note"] == "clear"
    assert record["shown"] in ("ab", "ba") and record["item"] == first["id"] and record["labeller"] == "ann"
    shown_a = item.response_a if record["shown"] == "ab" else item.response_b
    assert shown_a == first["a"]  # the recorded order is the order on screen


def test_each_grade_and_skip_is_recorded_as_the_seed_defines_it(tmp_path):
    client, store = _client(tmp_path, items=_items(6))
    expected = {"A++": ("a", 2), "A+": ("a", 1), "=": (None, 0), "B+": ("b", 1), "B++": ("b", 2), "skip": (None, 0)}
    for choice, (side, strength) in expected.items():
        item = _get(client)[1]["item"]
        _judge(client, item["id"], choice)
        record = read_records(tmp_path / "prefs.jsonl")[-1]
        assert record["strength"] == strength and record["choice"] == choice
        if side is None:
            assert record["chosen"] is None and record["rejected"] is None
        else:
            other = "b" if side == "a" else "a"
            assert record["chosen"] == item[side] and record["rejected"] == item[other]
    state = _get(client)[1]
    assert {k: state[k] for k in ("item", "done", "total", "mine", "labeller")} == {
        "item": None,
        "done": 6,
        "total": 6,
        "mine": 6,
        "labeller": "ann",
    }


def test_the_order_of_a_and_b_is_random_per_item_and_stable(tmp_path):
    store = LabelStore(_items(40), tmp_path / "prefs.jsonl", seed=3)
    orders = [store.order(item) for item in store.items]
    assert 10 < orders.count("ab") < 30  # both orders occur
    assert orders == [LabelStore(_items(40), tmp_path / "other.jsonl", seed=3).order(i) for i in store.items]


def test_undo_appends_a_retraction_and_shows_the_item_again(tmp_path):
    client, _ = _client(tmp_path)
    first = _get(client)[1]["item"]
    _judge(client, first["id"], "B+")
    status, state = client.post("/api/undo", headers={"X-Labeller": "ann"}).status_code, None
    state = client.get("/api/state", headers={"X-Labeller": "ann"}).get_json()
    assert status == 200 and state["item"]["id"] == first["id"] and state["done"] == 0
    records = read_records(tmp_path / "prefs.jsonl")
    assert [r["type"] for r in records] == ["judgement", "retraction"]
    assert records[1]["retracts"] == records[0]["id"] and active_judgements(records) == {}
    assert client.post("/api/undo", headers={"X-Labeller": "ann"}).status_code == 409  # nothing left to undo
    assert client.post("/api/undo", headers={"X-Labeller": "bob"}).status_code == 409  # not bob's judgement


def test_restart_resumes_at_the_first_item_not_judged(tmp_path):
    client, store = _client(tmp_path)
    for _ in range(3):
        _judge(client, _get(client)[1]["item"]["id"], "A+")
    undone = store.items[2].id
    client.post("/api/undo", headers={"X-Labeller": "ann"})  # the third judgement is retracted
    again, _ = _client(tmp_path)  # a new server on the same file
    status, state = _get(again, who="new")
    assert state["done"] == 2 and state["item"]["id"] == undone


def test_a_judged_item_cannot_be_judged_twice_nor_taken_from_someone(tmp_path):
    client, _ = _client(tmp_path)
    ann = _get(client, who="ann")[1]["item"]
    bob = _get(client, who="bob")[1]["item"]
    assert ann["id"] != bob["id"]  # never the same item to two people at once
    assert _judge(client, bob["id"], "A+", who="ann")[0] == 409
    assert _judge(client, ann["id"], "A+", who="ann")[0] == 200
    status, body = _judge(client, ann["id"], "B+", who="ann")
    assert status == 409 and body == {"error": "This item is already judged."}
    assert len(read_records(tmp_path / "prefs.jsonl")) == 1


def test_an_abandoned_item_goes_back_after_its_lease(tmp_path):
    client, _ = _client(tmp_path, lease_s=0.0)
    ann = _get(client, who="ann")[1]["item"]
    assert _get(client, who="bob")[1]["item"]["id"] == ann["id"]  # ann's lease ran out at once


@pytest.mark.parametrize(
    "body,status",
    [
        (b"not json", 400),
        (b"[]", 400),
        (b'{"choice": "A+"}', 400),
        (b'{"item": 3, "choice": "A+"}', 400),
        (b'{"item": "nope", "choice": "A+"}', 404),
        (b'{"item": "ITEM", "choice": "maybe"}', 400),
        (b'{"item": "ITEM", "choice": "A+", "note": 5}', 400),
    ],
)
def test_malformed_requests_get_a_4xx_with_one_line_and_write_nothing(tmp_path, body, status):
    client, store = _client(tmp_path)
    body = body.replace(b"ITEM", store.items[0].id.encode())
    response = client.post("/api/judge", data=body, headers={"Content-Type": "application/json", "X-Labeller": "a"})
    assert response.status_code == status
    message = response.get_json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "prefs.jsonl").exists() or read_records(tmp_path / "prefs.jsonl") == []
    assert client.get("/nowhere").status_code == 404 and client.delete("/api/judge").status_code == 405


def test_off_localhost_every_request_needs_the_token(tmp_path):
    client, store = _client(tmp_path, token="s3cret")
    assert client.get("/").status_code == 401 and client.get("/api/state").status_code == 401
    assert client.get("/api/state", headers={"X-Label-Token": "wrong"}).status_code == 401
    assert client.post("/api/judge", json={"item": store.items[0].id, "choice": "A+"}).status_code == 401
    assert client.get("/?token=s3cret").status_code == 200
    assert client.get("/api/state", headers={"X-Label-Token": "s3cret"}).status_code == 200


def test_hostile_answers_are_sent_as_data_and_kept_verbatim(tmp_path):
    client, _ = _client(tmp_path, items=[Item("prompt <b>bold</b>", HOSTILE, "fine")])
    state = _get(client)[1]
    assert HOSTILE in (state["item"]["a"], state["item"]["b"])  # JSON text; the page sets textContent
    _judge(client, state["item"]["id"], "A+")
    assert HOSTILE in {read_records(tmp_path / "prefs.jsonl")[0][k] for k in ("chosen", "rejected")}


def test_eight_labellers_at_once_store_every_judgement_exactly_once(tmp_path):
    """Eight threads label over real HTTP until the items run out: every item is judged exactly
    once, no two people were ever given the same item, and nothing was refused."""
    store = LabelStore(_items(64), tmp_path / "prefs.jsonl")
    server = make_server("127.0.0.1", 0, create_app(store), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    errors, judged = [], []

    def call(path, who, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            url + path, data=data, headers={"X-Labeller": who, "Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as response:
            return json.loads(response.read())

    def labeller(who):
        try:
            state = call("/api/state", who)
            while state["item"] is not None:
                judged.append(state["item"]["id"])
                state = call("/api/judge", who, {"item": state["item"]["id"], "choice": "A+"})
        except urllib.error.HTTPError as err:
            errors.append(err.read())

    threads = [threading.Thread(target=labeller, args=(f"l{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.shutdown()
    records = read_records(tmp_path / "prefs.jsonl")
    assert errors == [] and len(judged) == 64 == len(set(judged))
    assert sorted(r["item"] for r in records) == sorted(i.id for i in store.items)
    assert len({r["labeller"] for r in records}) > 1


def test_items_come_from_pairs_or_a_policy_never_both(tmp_path):
    with pytest.raises(ConfigError, match="either --pairs"):
        load_items(str(tmp_path / "o.jsonl"), None, None, "arithmetic", 4, 2, None, 8, 1.0, 0)
    pairs = tmp_path / "pairs.jsonl"
    write_items(pairs, _items(3))
    assert load_items(str(tmp_path / "o.jsonl"), str(pairs), None, "arithmetic", 4, 2, None, 8, 1.0, 0) == _items(3)


def test_answers_are_sampled_once_and_reused_on_restart(tmp_path, random_policy):
    out = str(tmp_path / "prefs.jsonl")
    items = load_items(out, None, random_policy, "arithmetic", 5, 3, None, 6, 1.0, 0)
    assert len(items) == 5 * 3  # every pair of three answers, for five prompts
    assert len({i.prompt for i in items}) == 5
    again = load_items(out, None, "no-such-policy.ckpt", "arithmetic", 5, 3, None, 6, 1.0, 0)  # the sidecar
    assert again == items


@pytest.mark.slow
def test_round_trip_twenty_judgements_train_a_reward_model_above_chance(tmp_path, sft_policy, monkeypatch):
    """Twenty arithmetic pairs judged through the server, always for the correct answer (by one
    grade or two) against an answer that gives no number, then ``--stage reward`` on the judgement file with
    strength margins: the reward model ranks 200 held-out pairs of the same kind above chance."""
    import random

    from shraygpt_rl.reward_model import RewardModel
    from shraygpt_rl.runner import run_stage

    def pairs(seed: int, n: int) -> list[Item]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            wrong = rng.choice(["I don't know.", "Maybe ask a calculator.", "Numbers are hard."])
            out.append(Item(f"User: What is {a} + {b}?\n\nAssistant:", str(a + b), wrong))
        return out  # response_a is right

    client, store = _client(tmp_path, items=pairs(0, 20))
    state = _get(client)[1]
    for n in range(20):
        item = store.by_id[state["item"]["id"]]
        grade = ("A" if state["item"]["a"] == item.response_a else "B") + ("++" if n % 2 else "+")
        status, state = _judge(client, item.id, grade)
        assert status == 200
    assert state["done"] == 20
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "rm.ckpt"
    args = f"--data.source {tmp_path / 'prefs.jsonl'} --data.val_size 2 --data.test_size 2 --data.batch_size 8 "
    args += f"--model.policy {sft_policy} --model.margin_from_strength true --model.export_path {out} "
    args += "--trainer.max_steps 100 --trainer.val_check_interval 50 --trainer.enable_progress_bar false"
    run_stage("reward", ["--config", str(ROOT / "configs" / "reward.yaml"), *args.split()])
    model = RewardModel.load_from_checkpoint(str(out)).eval()
    held_out = pairs(1, 200)
    prompts = [i.prompt for i in held_out]
    right = model.score(prompts, [i.response_a for i in held_out])
    wrong = model.score(prompts, [i.response_b for i in held_out])
    accuracy = (right > wrong).float().mean().item()
    print(f"reward model trained on 20 judged pairs: held-out accuracy {accuracy:.3f}")
    assert accuracy > 0.6


def test_answers_with_unicode_line_separators_survive_the_file(tmp_path):
    """Model output can hold U+2028, U+0085 or a form feed: str.splitlines cuts lines there."""
    odd = "one\u2028two\x85three\x0cfour\rfive"
    client, store = _client(tmp_path, items=[Item(odd, odd + "!", "plain")])
    _judge(client, _get(client)[1]["item"]["id"], "A+")
    (record,) = read_records(tmp_path / "prefs.jsonl")
    assert record["prompt"] == odd and odd + "!" in (record["chosen"], record["rejected"])
    pairs = tmp_path / "pairs.jsonl"
    write_items(pairs, [Item(odd, odd, odd)])
    assert load_items(str(tmp_path / "o.jsonl"), str(pairs), None, "arithmetic", 1, 2, None, 8, 1.0, 0)[0].prompt == odd


def test_answers_are_sampled_in_a_hugging_face_policys_own_template(tmp_path, tiny_hf):
    """The page samples through the policy's tokenizer and chat template (issue 34's review: it
    used the byte tokenizer and the course's format for any policy)."""
    folder = str(tiny_hf("llama", template="chatml"))
    items = load_items(str(tmp_path / "o.jsonl"), None, folder, "arithmetic", 2, 2, None, 6, 1.0, 0)
    assert items and all(item.prompt.startswith("<|im_start|>user\n") for item in items)


# -- several labellers per pair, quality control, the agreement report -----------------------------
def test_each_pair_gets_k_judgements_from_k_different_labellers(tmp_path):
    """With K = 3 and four labellers taking turns at random, every pair ends with exactly three
    judgements from three names; nobody is given a pair twice, and a pair is never held by more
    people than the judgements it still needs."""
    client, store = _client(tmp_path, items=_items(7), judgements_per_pair=3)
    rng, names = __import__("random").Random(0), ["ann", "bob", "cat", "dan"]
    given: dict[str, set] = {n: set() for n in names}
    for _ in range(200):
        who = rng.choice(names)
        state = _get(client, who=who)[1]
        if state["item"] is None:
            continue
        held = [h for h, _, kind in store._held.values()]
        assert all(held.count(i) <= 3 - len(store._votes().get(i, [])) for i in held)
        assert state["item"]["id"] not in given[who]  # never the same pair twice to one person
        status, _ = _judge(client, state["item"]["id"], rng.choice(["A+", "B++", "="]), who=who)
        assert status == 200
        given[who].add(state["item"]["id"])
    records = read_records(tmp_path / "prefs.jsonl")
    by_item: dict[str, list[str]] = {}
    for r in records:
        by_item.setdefault(r["item"], []).append(r["labeller"])
    assert len(by_item) == 7 and all(len(w) == 3 == len(set(w)) for w in by_item.values())
    assert store.progress() == (21, 21)
    for who in names:
        assert _get(client, who=who)[1]["item"] is None
        assert _judge(client, store.items[0].id, "A+", who=who)[0] == 409


def test_a_labeller_cannot_judge_a_pair_twice_though_it_needs_more(tmp_path):
    client, store = _client(tmp_path, judgements_per_pair=2)
    item = _get(client, who="ann")[1]["item"]
    assert _judge(client, item["id"], "A+", who="ann")[0] == 200
    status, body = _judge(client, item["id"], "B+", who="ann")
    assert status == 409 and body == {"error": "You have judged this pair already."}
    assert _get(client, who="bob")[1]["item"]["id"] == item["id"]  # it still needs bob


ANN = {"X-Labeller": "ann"}


def _gold_items(n: int = 4) -> dict[Item, str]:
    return {Item(f"Gold {i}: what is 1 + 1?", "2", "3"): "a" for i in range(n)}


def test_gold_and_repeat_items_come_at_their_rates_and_stay_out_of_the_verdicts(tmp_path):
    client, store = _client(tmp_path, items=_items(40), gold=_gold_items(), gold_rate=0.2, repeat_rate=0.2)
    for _ in range(200):
        state = _get(client)[1]
        if state["item"] is None:
            break
        item = store.by_id[state["item"]["id"]]
        right = "A+" if state["item"]["a"] == item.response_a else "B+"  # always response_a
        assert _judge(client, item.id, right)[0] == 200
    records = read_records(tmp_path / "prefs.jsonl")
    gold = [r for r in records if r.get("gold")]
    repeats = [r for r in records if r.get("repeat")]
    assert 1 <= len(gold) <= 4 and len({r["item"] for r in gold}) == len(gold)  # each gold pair once
    assert 3 <= len(repeats) and len({r["item"] for r in repeats}) == len(repeats)
    assert all(r["gold"] == "a" for r in gold)
    regular = [r for r in records if not r.get("gold") and not r.get("repeat")]
    assert len(regular) == 40 and store.progress() == (40, 40)
    figures = client.get("/api/stats").get_json()
    assert figures["pairs_judged"] == 40 and figures["labellers"]["ann"]["gold_accuracy"] == 1.0
    assert figures["labellers"]["ann"]["self_consistency"] == 1.0
    assert json.loads((tmp_path / "prefs.jsonl.stats.json").read_text()) == figures


def test_undoing_a_gold_judgement_gives_back_the_gold_pair(tmp_path):
    client, store = _client(tmp_path, items=_items(3), gold=_gold_items(1), gold_rate=0.99)
    item = _get(client)[1]["item"]
    assert item["prompt"].startswith("Gold")  # the draw all but always says gold
    _judge(client, item["id"], "A+")
    assert client.post("/api/undo", headers={"X-Labeller": "ann"}).get_json()["item"]["id"] == item["id"]
    _judge(client, item["id"], "A++")
    records = read_records(tmp_path / "prefs.jsonl")
    assert [r.get("gold") for r in records if r["type"] == "judgement"] == ["a", "a"]


def test_the_question_criteria_and_per_criterion_ratings(tmp_path):
    store = LabelStore(_items(), tmp_path / "prefs.jsonl")
    guide = {"question": "Which story suits a five-year-old?", "criteria": ["engagement", "clarity"]}
    client = create_app(store, guide=guide).test_client()
    state = _get(client)[1]
    assert state["guide"] == guide
    item = state["item"]["id"]
    bad = client.post("/api/judge", json={"item": item, "choice": "A+", "criteria": {"humour": "A+"}}, headers=ANN)
    assert bad.status_code == 400 and "engagement, clarity" in bad.get_json()["error"]
    bad = client.post("/api/judge", json={"item": item, "choice": "A+", "criteria": {"clarity": "great"}}, headers=ANN)
    assert bad.status_code == 400
    assert read_records(tmp_path / "prefs.jsonl") == []  # nothing written by a refused request
    ok = client.post("/api/judge", json={"item": item, "choice": "A+", "criteria": {"clarity": "B+"}}, headers=ANN)
    assert ok.status_code == 200
    assert read_records(tmp_path / "prefs.jsonl")[0]["criteria"] == {"clarity": "B+"}


def test_the_stats_page_escapes_names(tmp_path):
    client, store = _client(tmp_path)
    item = _get(client, who=HOSTILE)[1]["item"]
    _judge(client, item["id"], "A+", who=HOSTILE)
    page = client.get("/stats").get_data(as_text=True)
    assert "<script>window.pwned" not in page and "&lt;script&gt;" in page and 'id="alpha"' in page


def test_label_report_writes_trl_and_kto_rows_that_stages_read(tmp_path, capsys, monkeypatch):
    """Three labellers on five pairs through the server, then ``train.py --stage label_report``:
    its TRL preference file (with margins) and KTO file are read by the stages' DataModules."""
    from shraygpt_rl.cli import main as train
    from shraygpt_rl.data import PreferenceDataModule
    from shraygpt_rl.data.kto import KTODataModule

    client, store = _client(tmp_path, items=_items(8), judgements_per_pair=3)
    votes = {"ann": "A++", "bob": "A+", "cat": "B+"}  # 2 of 3 for response_a as shown
    for who, choice in votes.items():
        while (state := _get(client, who=who)[1])["item"] is not None:
            item = store.by_id[state["item"]["id"]]
            on_screen = (
                choice
                if state["item"]["a"] == item.response_a
                else choice.replace("A", "C").replace("B", "A").replace("C", "B")
            )
            _judge(client, item.id, on_screen, who=who)
    monkeypatch.chdir(tmp_path)
    figures = train(["--stage", "label_report", "--judgements", "prefs.jsonl"])
    printed = capsys.readouterr().out
    assert figures["pairs_kept"] == 8 and "Krippendorff's alpha (ordinal)" in printed and "cat" in printed
    assert figures["labellers"]["cat"]["agreement_with_majority"] == 0.0
    rows = [json.loads(line) for line in open("prefs.jsonl.preferences.jsonl")]
    assert len(rows) == 8 and all(r["margin"] == pytest.approx(2 / 3) for r in rows)
    assert all(
        r["chosen"] == store.by_id[[i.id for i in store.items if i.prompt == r["prompt"]][0]].response_a for r in rows
    )
    small = dict(tokenizer="byte", val_size=2, test_size=2, batch_size=4, max_length=64, max_prompt_length=48)
    pairs = PreferenceDataModule(source="prefs.jsonl.preferences.jsonl", **small)
    pairs.setup()
    batch = next(iter(pairs.train_dataloader()))
    assert torch_allclose(batch["strength"], 2 / 3)
    unpaired = KTODataModule(source="prefs.jsonl.kto.jsonl", **small)
    unpaired.setup()
    assert sum(len(unpaired.splits[s]) for s in ("train", "val", "test")) == 16


def torch_allclose(values, target: float) -> bool:
    import torch

    return bool(torch.allclose(values, torch.full_like(values, target)))


class TwoRobots(RobotLabellers):
    """Two labellers who find A slightly better overall and significantly clearer."""

    names, criteria = ("ann", "bob"), {"clarity": "A++"}

    @staticmethod
    def choice(n: int) -> str:
        return "A+"


def test_train_py_label_with_gold_pairs_k_and_criteria(tmp_path, monkeypatch, capsys):
    """``--stage label`` through train.py with ``--pairs``, ``--gold``, ``--judgements_per_pair``
    and ``--criteria``: gold judgements are recorded as such, every pair gets two names, and the
    report is written beside the judgements when the server stops. A bad gold file is one sentence."""
    from conftest import fails

    import shraygpt_rl.label
    from shraygpt_rl.cli import main as train

    monkeypatch.setattr(shraygpt_rl.label, "make_server", TwoRobots)
    monkeypatch.chdir(tmp_path)
    write_items("pairs.jsonl", _items(6))
    gold = [{"prompt": f"Gold {i}", "response_a": "2", "response_b": "3", "better": "a"} for i in range(3)]
    Path("gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    args = ["--stage", "label", "--pairs", "pairs.jsonl", "--gold", "gold.jsonl", "--gold_rate", "0.5"]
    train([*args, "--judgements_per_pair", "2", "--criteria", "[clarity]", "--out", "prefs.jsonl"])
    records = read_records("prefs.jsonl")
    regular = [r for r in records if not r.get("gold")]
    assert len(regular) == 12 and {r["labeller"] for r in regular} == {"ann", "bob"}
    assert any(r.get("gold") == "a" for r in records) and all(r["criteria"] == {"clarity": "A++"} for r in records)
    stats = json.loads(Path("prefs.jsonl.stats.json").read_text())
    assert stats["votes_per_pair"] == {"2": 6} and stats["labellers"]["ann"]["gold_count"] >= 1
    Path("bad-gold.jsonl").write_text(json.dumps({**gold[0], "better": "both"}) + "\n")
    message = fails(capsys, [*args[:-4], "--gold", "bad-gold.jsonl", "--out", "other.jsonl"])
    assert message == "bad-gold.jsonl, pair 1: 'better' must be 'a' or 'b', got 'both'."


def test_wrong_json_types_are_a_400_and_write_nothing(tmp_path):
    client, store = _client(tmp_path, judgements_per_pair=2)
    item = _get(client)[1]["item"]["id"]
    for body in ({"item": item, "choice": ["A+"]}, {"item": item, "choice": "A+", "criteria": {"x": ["A+"]}}):
        response = client.post("/api/judge", json=body, headers=ANN)
        assert response.status_code == 400, (body, response.get_json())
    assert read_records(tmp_path / "prefs.jsonl") == []


def test_a_name_beyond_latin_1_is_sent_percent_encoded(tmp_path):
    """A header carries Latin-1 only, so the page percent-encodes the name and the server decodes it."""
    client, _ = _client(tmp_path)
    name = "李雷 Łukasz 🙂"
    encoded = urllib.parse.quote(name)
    item = client.get("/api/state", headers={"X-Labeller": encoded}).get_json()["item"]["id"]
    client.post("/api/judge", json={"item": item, "choice": "A+"}, headers={"X-Labeller": encoded})
    assert read_records(tmp_path / "prefs.jsonl")[0]["labeller"] == name
    assert "encodeURIComponent(labeller)" in PAGE


def test_a_repeat_draw_skips_pairs_no_longer_served(tmp_path):
    """A restart with another pairs file: the labeller's earlier pairs are not in it, and a
    repeat must not pick one (before: a KeyError, a 500 on every request of that labeller)."""
    client, _ = _client(tmp_path, items=_items(4))
    for _ in range(4):
        _judge(client, _get(client)[1]["item"]["id"], "A+")
    other = [Item(f"Other {i}", "x", "y") for i in range(3)]
    again, _ = _client(tmp_path, items=other, repeat_rate=0.9)
    status, state = _get(again)
    assert status == 200 and state["item"]["prompt"].startswith("Other")


def test_reports_written_at_once_are_each_whole(tmp_path):
    client, store = _client(tmp_path, items=_items(20), judgements_per_pair=2)
    for who in ("ann", "bob"):
        while (state := _get(client, who=who)[1])["item"] is not None:
            _judge(client, state["item"]["id"], "A+", who=who)
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.get("/api/stats").status_code)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8
    assert json.loads((tmp_path / "prefs.jsonl.stats.json").read_text())["pairs_judged"] == 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no file left half-way


def test_a_min_agreement_outside_0_1_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_items("pairs.jsonl", _items(2))
    message = fails(capsys, ["--stage", "label", "--pairs", "pairs.jsonl", "--min_agreement", "1.5"])
    assert message == "--min_agreement must be a share between 0 and 1, got 1.5."
    Path("prefs.jsonl").write_text("")
    message = fails(capsys, ["--stage", "label_report", "--judgements", "prefs.jsonl", "--min_agreement", "-0.1"])
    assert message == "--min_agreement must be a share between 0 and 1, got -0.1."
