"""``python train.py --stage label``: a local page on which a person judges pairs of answers.

The items come from a JSONL of ``prompt``/``response_a``/``response_b`` (``--pairs``), or are
sampled before serving: ``--responses_per_prompt`` answers from ``--policy`` to each of
``--num_prompts`` prompts of ``--prompts`` (any prompt source the online stages read), every pair
of a prompt's answers one item. Judgements go to ``--out`` as they are made
(``shraygpt_rl.data.labels``); a restart with the same ``--out`` resumes where labelling stopped,
and ``--data.source <out>`` trains the reward model on them.

The server is Flask on werkzeug's threaded server: a small, well-kept framework whose test
client the tests use, and threads are enough for a handful of people (every write holds the
store's lock). It binds 127.0.0.1; any other ``--host`` requires the access token it prints, on
every request. Errors are one line of JSON with a 4xx code, never a traceback page.
"""

from __future__ import annotations

import hmac
import html
import itertools
import json
import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import unquote

import torch
from flask import Flask, jsonify, request
from tqdm.auto import tqdm
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.data.agreement import aggregate, exportable, preference_rows, report, unpaired_rows
from shraygpt_rl.data.labels import Item, LabelError, LabelStore, read_gold, read_items, read_records, write_items
from shraygpt_rl.errors import ConfigError
from shraygpt_rl.generation import sample_and_decode
from shraygpt_rl.policy import load_policy
from shraygpt_rl.runner import data_from_config, policy_tokenizer

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def label(
    out: str = "labels/prefs.jsonl",
    pairs: str | None = None,
    policy: str | None = None,
    prompts: str = "arithmetic",
    num_prompts: int = 100,
    responses_per_prompt: int = 2,
    data_config: str | None = "configs/sft.yaml",
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    host: str = "127.0.0.1",
    port: int = 7860,
    lease_s: float = 600.0,
    judgements_per_pair: int = 1,
    question: str | None = None,
    criteria: list[str] | None = None,
    gold: str | None = None,
    gold_rate: float = 0.1,
    repeat_rate: float = 0.0,
    min_agreement: float = 0.5,
) -> None:
    """Serve the labelling page until Ctrl-C.

    Args:
        out: The judgement file (JSONL), appended to; an existing one is resumed.
        pairs: A JSONL of ``prompt``, ``response_a``, ``response_b`` to judge (no model needed).
        policy: A policy checkpoint (or Hugging Face model) that writes the answers instead.
        prompts: With ``policy``: the prompt source (a built-in task, HH-RLHF, Dolly, ``stories``,
            a ``.txt`` or JSONL of prompts).
        num_prompts: With ``policy``: how many prompts.
        responses_per_prompt: With ``policy``: answers per prompt; each pair of them is one item.
        data_config: A stage config whose ``data:`` section says how prompts are built (tokenizer,
            system prompt, lengths).
        max_new_tokens: Longest sampled answer.
        temperature: Sampling temperature of the answers.
        seed: Seeds the sampling and the A/B order of each item.
        host: Where to listen; anything but 127.0.0.1 requires the printed access token.
        port: The port.
        lease_s: Seconds an item stays with a labeller who stopped answering.
        judgements_per_pair: How many different labellers judge each pair (seed 004's several
            evaluators per comparison); each pair is served until that many have.
        question: The question the labellers answer, shown above the answers.
        criteria: What to judge by (seed 004's: age-appropriateness, engagement, accuracy,
            clarity, interactivity), shown under the question, each with an optional rating.
        gold: A JSONL of pairs whose better answer is known (``better``: ``a`` or ``b``), mixed in
            to measure each labeller's accuracy; kept out of the training data.
        gold_rate: With ``gold``: the share of items that are gold pairs.
        repeat_rate: The share of items that show a labeller a pair they judged before, to
            measure their self-consistency; kept out of the training data.
        min_agreement: For the agreement report (``/stats``): the share of a pair's votes its
            majority needs for the pair to be kept (``shraygpt_rl.data.agreement``).
    """
    check_min_agreement(min_agreement)
    items = load_items(
        out, pairs, policy, prompts, num_prompts, responses_per_prompt, data_config, max_new_tokens, temperature, seed
    )
    token = None if host in LOOPBACK else secrets.token_urlsafe(16)
    golden = read_gold(gold) if gold else {}
    rates = dict(gold_rate=gold_rate if golden else 0.0, repeat_rate=repeat_rate)
    store = LabelStore(
        items, Path(out), seed=seed, lease_s=lease_s, judgements_per_pair=judgements_per_pair, gold=golden, **rates
    )
    app = create_app(
        store, token, guide={"question": question, "criteria": list(criteria or [])}, min_agreement=min_agreement
    )
    done, needed = store.progress()
    address = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(
        f"labelling {len(items)} items x {judgements_per_pair} judgements ({done} of {needed} made) into {out}\n"
        f"open {address} (agreement: {address.replace('/?', '/stats?') if token else address + 'stats'})\n"
        "(Ctrl-C stops; nothing is lost)"
    )
    server = make_server(host, port, app, threaded=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped; {store.progress()[0]} of {store.progress()[1]} judgements made in {out}")
    finally:
        server.server_close()
        write_stats(store, min_agreement)


def check_min_agreement(value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(f"--min_agreement must be a share between 0 and 1, got {value}.")


def label_report(judgements: str = "labels/prefs.jsonl", min_agreement: float = 0.5) -> dict:
    """Aggregate a judgement file into training data and report the labellers' agreement.

    Writes beside it ``<judgements>.preferences.jsonl`` (TRL's preference rows: ``prompt``,
    ``chosen``, ``rejected``, and the strength as ``margin``), ``<judgements>.kto.jsonl`` (KTO's
    unpaired rows) and ``<judgements>.stats.json`` (the report), and prints the report.

    Args:
        judgements: The labelling page's judgement file.
        min_agreement: The share of a pair's votes its majority needs for the pair to be kept.
    """
    check_min_agreement(min_agreement)
    path = Path(judgements)
    if not path.is_file():
        raise ConfigError(f"No judgement file at '{path}'.")
    records = read_records(path)
    verdicts = aggregate(records, min_agreement)
    figures = report(records, min_agreement)
    for suffix, rows in (("preferences", preference_rows(verdicts)), ("kto", unpaired_rows(verdicts))):
        with open(f"{path}.{suffix}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    Path(f"{path}.stats.json").write_text(json.dumps(figures, indent=2) + "\n")
    alpha = figures["krippendorff_alpha_ordinal"]
    print(
        f"{path}: {figures['pairs_judged']} pairs judged, {figures['pairs_kept']} kept (min_agreement {min_agreement})"
    )
    print(f"votes per pair: {figures['votes_per_pair']}; Krippendorff's alpha (ordinal): {_figure(alpha)}")
    print(f"all votes in one direction on {_figure(figures['unanimous_share'])} of pairs with two votes or more")
    print(f"{'labeller':<20}{'judgements':>11}{'agrees w/ majority':>20}{'gold accuracy':>15}{'self-consistency':>18}")
    for name, row in sorted(figures["labellers"].items()):
        rates = [_figure(row[k]) for k in ("agreement_with_majority", "gold_accuracy", "self_consistency")]
        print(f"{name[:19]:<20}{row['judgements']:>11}{rates[0]:>20}{rates[1]:>15}{rates[2]:>18}")
    left_out = figures["pairs_kept"] - len(exportable(verdicts))
    if left_out:
        print(f"{left_out} kept pair(s) with an empty answer left out of the TRL and KTO files (TRL needs text)")
    print(f"wrote {path}.preferences.jsonl, {path}.kto.jsonl and {path}.stats.json")
    return figures


def load_items(
    out, pairs, policy, prompts, num_prompts, responses_per_prompt, data_config, max_new_tokens, temperature, seed
) -> list[Item]:
    """The items: from ``pairs``; else those sampled for this ``out`` before (``<out>.items.jsonl``,
    so that a restart resumes the same items); else sampled now from ``policy``."""
    if (pairs is None) == (policy is None):
        raise ConfigError("Give either --pairs (a JSONL of prompt, response_a, response_b) or --policy to sample from.")
    if pairs is not None:
        return read_items(pairs)
    sidecar = Path(f"{out}.items.jsonl")
    if sidecar.is_file():
        print(f"reusing the answers sampled for {out} earlier ({sidecar})")
        return read_items(sidecar)
    if responses_per_prompt < 2 or num_prompts < 1:
        raise ConfigError("--responses_per_prompt must be at least 2 and --num_prompts at least 1.")
    model = load_policy(policy).eval()
    overrides = dict(source=prompts, train_size=num_prompts, batch_size=16, **policy_tokenizer(model, data_config))
    data = data_from_config(PromptDataModule, data_config, **overrides)  # the policy's own tokenizer and template
    items = sample_items(model, data, num_prompts, responses_per_prompt, max_new_tokens, temperature, seed)
    write_items(sidecar, items)
    return items


@torch.no_grad()
def sample_items(policy, data, num_prompts, responses_per_prompt, max_new_tokens, temperature, seed) -> list[Item]:
    """``responses_per_prompt`` answers to each of the first ``num_prompts`` training prompts, with
    a progress bar; every pair of one prompt's answers is an item."""
    generator = torch.Generator().manual_seed(seed)
    items, seen = [], 0
    batches = data.plain_dataloader("train")
    total = min(num_prompts, len(data.splits["train"]))
    with tqdm(total=total, desc="sampling answers", unit="prompt") as bar:
        for batch in batches:
            ids = batch["input_ids"].repeat_interleave(responses_per_prompt, dim=0)
            mask = batch["attention_mask"].repeat_interleave(responses_per_prompt, dim=0)
            _, texts = sample_and_decode(
                policy, ids, mask, data.tokenizer, max_new_tokens, temperature=temperature, generator=generator
            )
            for i, prompt in enumerate(batch["prompt"][: total - seen]):
                answers = texts[i * responses_per_prompt : (i + 1) * responses_per_prompt]
                items += [Item(prompt, a, b) for a, b in itertools.combinations(answers, 2)]
            seen = min(total, seen + len(batch["prompt"]))
            bar.update(seen - bar.n)
            if seen >= total:
                break
    return items


def write_stats(store: LabelStore, min_agreement: float = 0.5) -> dict:
    """The agreement report of the judgements so far (``agreement.report``), written beside them."""
    figures = report(store.records(), min_agreement)
    path = Path(f"{store.out}.stats.json")
    # Requests can write at once: each writes its own file and moves it into place whole.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            f.write(json.dumps(figures, indent=2) + "\n")
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
    return figures


def create_app(
    store: LabelStore, token: str | None = None, guide: dict | None = None, min_agreement: float = 0.5
) -> Flask:
    """The page and its calls: ``GET /api/state``, ``POST /api/judge``, ``POST /api/undo``, and
    the agreement report, ``GET /api/stats`` (JSON) and ``GET /stats`` (a page); each report is
    also written beside the judgements. ``guide``: the ``question`` and ``criteria`` shown."""
    app = Flask(__name__)
    guide = {"question": None, "criteria": [], **(guide or {})}

    @app.before_request
    def check_token():
        if token is None:
            return None
        given = request.headers.get("X-Label-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given, token):
            return _error("This page needs its access token: open the address the server printed.", 401)
        return None

    def labeller() -> str:  # percent-encoded by the page: a header carries Latin-1 only
        return unquote(request.headers.get("X-Labeller", "")).strip()[:64] or "anonymous"

    @app.get("/")
    def page():
        return PAGE, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}

    @app.get("/api/state")
    def state():
        return jsonify({**store.state(labeller()), "guide": guide})

    @app.post("/api/judge")
    def judge():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("item"), str) or "choice" not in body:
            return _error('The body must be JSON like {"item": "<id>", "choice": "A+", "note": ""}.', 400)
        criteria = body.get("criteria") or {}
        if not isinstance(criteria, dict) or not set(criteria) <= set(guide["criteria"]):
            return _error(f"Criteria must be among: {', '.join(guide['criteria']) or 'none'}.", 400)
        done = store.judge(labeller(), body["item"], body["choice"], body.get("note") or "", criteria)
        return jsonify({**done, "guide": guide})

    @app.get("/api/stats")
    def stats():
        return jsonify(write_stats(store, min_agreement))

    @app.get("/stats")
    def stats_page():
        html = stats_html(write_stats(store, min_agreement))
        return html, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}

    @app.post("/api/undo")
    def undo():
        return jsonify({**store.undo(labeller()), "guide": guide})

    @app.errorhandler(LabelError)
    def refused(err: LabelError):
        return _error(str(err), err.status)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        return _error(f"{err.code} {err.name}.", err.code or 400)

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        return _error(f"The server could not do that ({type(err).__name__}); nothing was written.", 500)

    return app


def _error(message: str, status: int):
    return jsonify({"error": message}), status


def _figure(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def stats_html(figures: dict) -> str:
    """The agreement report as a page: the pairs, alpha and the per-labeller table (names escaped)."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{row['judgements']}</td>"
        f"<td>{_figure(row['agreement_with_majority'])} ({row['majority_count']})</td>"
        f"<td>{_figure(row['gold_accuracy'])} ({row['gold_count']})</td>"
        f"<td>{_figure(row['self_consistency'])} ({row['repeat_count']})</td></tr>"
        for name, row in sorted(figures["labellers"].items())
    )
    votes = ", ".join(f"{k}: {v}" for k, v in figures["votes_per_pair"].items()) or "none yet"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>shraygpt-rl: agreement</title>
<style>body {{ font: 16px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 900px; }}
td, th {{ padding: .3rem .8rem; text-align: left; border-bottom: 1px solid #ddd; }}</style></head><body>
<h1>Agreement</h1>
<p>Pairs judged: <b id="pairs">{figures["pairs_judged"]}</b>;
kept for training: <b id="kept">{figures["pairs_kept"]}</b>
(majority share at least {figures["min_agreement"]}). Votes per pair: {votes}.</p>
<p>Krippendorff's alpha (ordinal): <b id="alpha">{_figure(figures["krippendorff_alpha_ordinal"])}</b>.
All votes in one direction: <b id="unanimous">{_figure(figures["unanimous_share"])}</b>
of pairs with two votes or more.</p>
<table id="labellers"><tr><th>labeller</th><th>judgements</th><th>agrees with the others' majority</th>
<th>gold accuracy</th><th>self-consistency</th></tr>{rows}</table>
<p>Counts in brackets. Also written to the <code>.stats.json</code> beside the judgements.</p></body></html>
"""


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>shraygpt-rl: which answer is better?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 16px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1rem 1.5rem; color: #222; }
 header { display: flex; justify-content: space-between; align-items: baseline; }
 #progress { font-variant-numeric: tabular-nums; color: #555; }
 pre { white-space: pre-wrap; word-wrap: break-word; font: inherit; margin: 0; }
 #prompt { background: #f3f3f3; padding: .75rem 1rem; border-radius: 6px; max-height: 14rem; overflow: auto; }
 .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
 .answer { border: 1px solid #ccc; border-radius: 6px; padding: .75rem 1rem; min-height: 6rem; }
 .answer h2 { font-size: 1rem; margin: 0 0 .5rem; color: #555; }
 .choices { display: flex; flex-wrap: wrap; gap: .5rem; }
 button { font: inherit; padding: .5rem .9rem; border-radius: 6px; border: 1px solid #888; background: #fff; }
 button { cursor: pointer; }
 button:hover { background: #eef; } kbd { font-size: .8em; color: #777; }
 textarea { width: 100%; box-sizing: border-box; margin-top: .75rem; font: inherit; }
 #status { color: #a00; min-height: 1.5em; } #done { font-size: 1.2rem; }
</style></head>
<body>
<header><h1>Which answer is better?</h1>
<span><span id="who"></span> <button id="rename" hidden>not you?</button>
<span id="progress">0 / 0</span></span></header>
<form id="name-form" hidden>
 <label>Your name (recorded with each judgement; asked once):
 <input id="name" autocomplete="name" maxlength="64" required></label> <button type="submit">Start</button>
</form>
<div id="work" hidden>
 <div id="guide"><h2 id="question"></h2><ul id="criteria"></ul></div>
 <pre id="prompt"></pre>
 <div class="answers">
  <div class="answer"><h2>A</h2><pre id="answer-a"></pre></div>
  <div class="answer"><h2>B</h2><pre id="answer-b"></pre></div>
 </div>
 <div class="choices">
  <button data-choice="A++">A is significantly better <kbd>1</kbd></button>
  <button data-choice="A+">A is slightly better <kbd>2</kbd></button>
  <button data-choice="=">About the same <kbd>3</kbd></button>
  <button data-choice="B+">B is slightly better <kbd>4</kbd></button>
  <button data-choice="B++">B is significantly better <kbd>5</kbd></button>
  <button data-choice="skip">Skip <kbd>s</kbd></button>
  <button id="undo">Undo <kbd>u</kbd></button>
 </div>
 <table id="ratings"></table>
 <textarea id="note" rows="2" placeholder="Optional note about this pair"></textarea>
</div>
<p id="done" hidden>Every item is judged. Thank you!</p>
<p id="status"></p>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
// "labeller-name", not "labeller": the page before names kept a random id under that key
let labeller = localStorage.getItem("labeller-name") || "";
const GRADES = ["A++", "A+", "=", "B+", "B++"];
const KEYS = {"1": "A++", "2": "A+", "3": "=", "4": "B+", "5": "B++", "s": "skip"};
let current = null, busy = false;

async function call(path, body) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: {"Content-Type": "application/json", "X-Label-Token": token, "X-Labeller": encodeURIComponent(labeller)},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function guide(given) {  // the question and criteria, and a rating row per criterion
  document.getElementById("question").textContent = given.question || "";
  const list = document.getElementById("criteria"), table = document.getElementById("ratings");
  if (list.childElementCount === given.criteria.length) return;
  list.replaceChildren(), table.replaceChildren();
  for (const name of given.criteria) {
    const entry = document.createElement("li");
    entry.textContent = name;
    list.append(entry);
    const row = table.insertRow(), label = row.insertCell();
    label.textContent = name + " (optional):";
    for (const grade of GRADES) {
      const cell = row.insertCell(), input = document.createElement("input"), text = document.createElement("label");
      input.type = "radio", input.name = "criterion:" + name, input.value = grade, input.dataset.criterion = name;
      text.append(input, " " + grade);
      cell.append(text);
    }
  }
}

function ratings() {
  const chosen = {};
  for (const input of document.querySelectorAll("#ratings input:checked")) {
    chosen[input.dataset.criterion] = input.value;
  }
  return chosen;
}

function show(state) {  // model output is text: textContent, never innerHTML
  document.getElementById("progress").textContent = state.done + " / " + state.total;
  document.getElementById("who").textContent = labeller + " (" + state.mine + " judged)";
  document.getElementById("rename").hidden = false;
  guide(state.guide);
  for (const input of document.querySelectorAll("#ratings input")) input.checked = false;
  current = state.item;
  document.getElementById("work").hidden = current === null;
  document.getElementById("done").hidden = current !== null;
  if (current !== null) {
    document.getElementById("prompt").textContent = current.prompt;
    document.getElementById("answer-a").textContent = current.a;
    document.getElementById("answer-b").textContent = current.b;
    document.getElementById("note").value = "";
  }
}

async function act(path, body) {
  if (busy) return;
  busy = true;
  try { show(await call(path, body)); document.getElementById("status").textContent = ""; }
  catch (err) { document.getElementById("status").textContent = err.message; }
  finally { busy = false; }
}

function judge(choice) {
  if (current === null) return;
  const note = document.getElementById("note").value;
  act("/api/judge", {item: current.id, choice: choice, note: note, criteria: ratings()});
}

for (const button of document.querySelectorAll("button[data-choice]")) {
  button.addEventListener("click", () => judge(button.dataset.choice));
}
document.getElementById("undo").addEventListener("click", () => act("/api/undo", {}));
document.addEventListener("keydown", (event) => {
  const tag = event.target.tagName;  // keys grade, except while typing (a radio button is not typing)
  if (!labeller || tag === "TEXTAREA" || (tag === "INPUT" && event.target.type !== "radio")) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key in KEYS) { event.preventDefault(); judge(KEYS[event.key]); }
  else if (event.key === "u") { event.preventDefault(); act("/api/undo", {}); }
});
document.getElementById("name-form").addEventListener("submit", (event) => {
  event.preventDefault();
  labeller = document.getElementById("name").value.trim();
  if (!labeller) return;
  localStorage.setItem("labeller-name", labeller);
  document.getElementById("name-form").hidden = true;
  act("/api/state");
});
document.getElementById("rename").addEventListener("click", () => {
  labeller = "";
  localStorage.removeItem("labeller-name");
  document.getElementById("work").hidden = document.getElementById("rename").hidden = true;
  document.getElementById("name-form").hidden = false;
});
if (labeller) act("/api/state"); else document.getElementById("name-form").hidden = false;
</script>
</body></html>
"""
