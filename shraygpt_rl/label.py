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
import itertools
import secrets
from pathlib import Path

import torch
from flask import Flask, jsonify, request
from tqdm.auto import tqdm
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from shraygpt_rl.data import PromptDataModule
from shraygpt_rl.data.labels import Item, LabelError, LabelStore, read_items, write_items
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
    """
    items = load_items(
        out, pairs, policy, prompts, num_prompts, responses_per_prompt, data_config, max_new_tokens, temperature, seed
    )
    token = None if host in LOOPBACK else secrets.token_urlsafe(16)
    store = LabelStore(items, Path(out), seed=seed, lease_s=lease_s)
    app = create_app(store, token)
    done, _ = store.progress()
    address = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    print(f"labelling {len(items)} items ({done} judged) into {out}\nopen {address}\n(Ctrl-C stops; nothing is lost)")
    server = make_server(host, port, app, threaded=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped; {store.progress()[0]} of {len(items)} judged in {out}")
    finally:
        server.server_close()


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


def create_app(store: LabelStore, token: str | None = None) -> Flask:
    """The page and its three calls: ``GET /api/state``, ``POST /api/judge`` and ``POST /api/undo``."""
    app = Flask(__name__)

    @app.before_request
    def check_token():
        if token is None:
            return None
        given = request.headers.get("X-Label-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given, token):
            return _error("This page needs its access token: open the address the server printed.", 401)
        return None

    def labeller() -> str:
        return request.headers.get("X-Labeller", "anonymous")[:64]

    @app.get("/")
    def page():
        return PAGE, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}

    @app.get("/api/state")
    def state():
        return jsonify(store.state(labeller()))

    @app.post("/api/judge")
    def judge():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("item"), str) or "choice" not in body:
            return _error('The body must be JSON like {"item": "<id>", "choice": "A+", "note": ""}.', 400)
        return jsonify(store.judge(labeller(), body["item"], body["choice"], body.get("note") or ""))

    @app.post("/api/undo")
    def undo():
        return jsonify(store.undo(labeller()))

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
<header><h1>Which answer is better?</h1><span id="progress">0 / 0</span></header>
<div id="work">
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
 <textarea id="note" rows="2" placeholder="Optional note about this pair"></textarea>
</div>
<p id="done" hidden>Every item is judged. Thank you!</p>
<p id="status"></p>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const labeller = localStorage.getItem("labeller") || Math.random().toString(36).slice(2) + Date.now().toString(36);
localStorage.setItem("labeller", labeller);
const KEYS = {"1": "A++", "2": "A+", "3": "=", "4": "B+", "5": "B++", "s": "skip"};
let current = null, busy = false;

async function call(path, body) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: {"Content-Type": "application/json", "X-Label-Token": token, "X-Labeller": labeller},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function show(state) {  // model output is text: textContent, never innerHTML
  document.getElementById("progress").textContent = state.done + " / " + state.total;
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
  act("/api/judge", {item: current.id, choice: choice, note: document.getElementById("note").value});
}

for (const button of document.querySelectorAll("button[data-choice]")) {
  button.addEventListener("click", () => judge(button.dataset.choice));
}
document.getElementById("undo").addEventListener("click", () => act("/api/undo", {}));
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "TEXTAREA" || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key in KEYS) { event.preventDefault(); judge(KEYS[event.key]); }
  else if (event.key === "u") { event.preventDefault(); act("/api/undo", {}); }
});
act("/api/state");
</script>
</body></html>
"""
