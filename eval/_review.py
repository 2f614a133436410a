"""The review page of ``fairtune review``: what it shows of an audit, and the flags it makes.

:class:`AuditView` reads an audit folder (``metrics.json`` and ``images/``) and renders the page: every
audited prompt's image grid, its judged mix with 95% intervals against the target, and buttons to flag
one image or the whole prompt as biased (with the direction seen and a note), and to propose a prompt
to audit next. :meth:`AuditView.flag` turns a request of the page into a :class:`fairtune.data.Flag`
with the prompt, the model and adapter (by content hash), the audit folder and the image's index, its
seed and the generation settings that regenerate it. The HTTP server that serves the page and writes
to the flag store is the command's, in ``fairtune.cli``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from fairtune.data import Flag, content_hash, format_number
from fairtune.models import resolve_shipped

from ._stats import share_box


def _model_hash(model: str | None) -> str | None:
    """Content hash of a model folder, or of a folder a package registers by name (``resolve_shipped``);
    ``None`` for a hub id."""
    if not model:
        return None
    path = resolve_shipped(model)
    return content_hash(path) if path.exists() else None


class AuditView:
    """What the page shows of one audit folder (``metrics.json`` and ``images/``).

    Args:
        audit: A folder written by ``fairtune audit`` (or ``fairtune compare``).
        method: The method to review; ``None``: the first (an audit has one).

    Raises:
        FileNotFoundError: No ``metrics.json``, or no ``images/`` (audits before images were saved:
            run the audit again).
        ValueError: An unknown method.
    """

    def __init__(self, audit: str | Path, method: str | None = None) -> None:
        self.dir = Path(audit).resolve()
        mpath = self.dir / "metrics.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"no metrics.json in {self.dir}: run `fairtune audit` first")
        self.metrics = json.loads(mpath.read_text())
        names = list(self.metrics["methods"])
        if method is None:
            method = names[0]
        if method not in names:
            raise ValueError(f"method {method!r} is not in {mpath} (methods: {names})")
        self.method = method
        self.method_index = names.index(method)
        self.images_dir = self.dir / "images" / str(self.method_index)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"no images/ in {self.dir}: this audit kept no images; run `fairtune audit` again "
                "(it saves them by default)"
            )
        m = self.metrics["methods"][method]
        self.entries = self.metrics["prompts"]
        self.per_concept = m["per_concept"]
        self.n = int(self.metrics["generation"]["n_per_prompt"])
        self.classes = list(self.metrics["classes"])
        self.attribute = self.metrics.get("attribute")
        backbone = self.metrics.get("backbone") or {}
        self.model = str(backbone.get("pretrained") or backbone.get("kind") or "unknown")
        self.adapter = m.get("adapter")
        self.model_hash = _model_hash(backbone.get("pretrained"))
        self.adapter_hash = (
            content_hash(self.adapter) if self.adapter and Path(self.adapter).exists() else None
        )
        self.settings = {
            **{k: self.metrics["generation"][k] for k in ("steps", "guidance_scale", "seed")},
            "backbone": backbone,
        }

    def entry(self, key: str) -> tuple[int, dict]:
        for b, e in enumerate(self.entries):
            if e["key"] == key:
                return b, e
        raise KeyError(key)

    def flag(self, data: dict) -> Flag:
        """The flag a page request describes (``key``, ``scope``, ``index``, ``direction``, ``note``,
        ``reviewer``). Raises ``ValueError`` naming a bad field."""
        key = data.get("key")
        try:
            b, e = self.entry(str(key))
        except KeyError:
            raise ValueError(f"unknown prompt key {key!r}") from None
        scope = data.get("scope", "prompt")
        index = data.get("index")
        if scope == "image":
            # a JSON true is a Python int too: only a JSON integer names an image
            if type(index) is not int or not 0 <= index < self.n:
                raise ValueError(f"image index must be an integer in [0, {self.n}), got {index!r}")
        elif scope == "prompt":
            index = None
        else:
            raise ValueError(f"scope must be 'image' or 'prompt', got {scope!r}")
        direction = data.get("direction") or None
        if direction is not None and direction not in self.classes:
            raise ValueError(f"direction must be one of {self.classes}, got {direction!r}")
        return Flag(
            prompt=e["prompt"], concept=e["concept"], model=self.model, model_hash=self.model_hash,
            adapter=self.adapter, adapter_hash=self.adapter_hash,
            reviewer=str(data.get("reviewer") or "").strip(),
            scope=scope, audit_run=str(self.dir), image_index=index,
            seed=None if index is None else int(self.settings["seed"]) + index, settings=self.settings,
            attribute=self.attribute, direction=direction, note=str(data.get("note") or ""),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------ the page
    def page(self, reviewer: str, flags: list[Flag] = ()) -> str:
        """The review page (one HTML document; images load from ``/img/...``); ``flags`` already in
        the store for this audit are marked (flagged prompts and images framed red, with a count)."""
        esc = html.escape
        flagged_prompts: dict[str, int] = {}
        flagged_images: set[tuple[str, int]] = set()
        for f in flags:
            if f.scope == "prompt":
                flagged_prompts[f.prompt] = flagged_prompts.get(f.prompt, 0) + 1
            elif f.image_index is not None:
                flagged_images.add((f.prompt, f.image_index))
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>fairtune review</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>Review: {esc(self.metrics.get('title', str(self.dir)))}</h1>",
            f"<p class='meta'>audit <code>{esc(str(self.dir))}</code> · model <code>{esc(self.model)}</code>"
            + (f" · adapter <code>{esc(str(self.adapter))}</code>" if self.adapter else "")
            + f" · attribute <b>{esc(str(self.attribute))}</b> · {self.n} images per prompt</p>",
            "<p class='who'>Reviewer <input id='reviewer' value='" + esc(reviewer, quote=True) + "'> "
            "<span id='status' role='status'></span></p>",
        ]
        for b, e in enumerate(self.entries):
            r = self.per_concept.get(e["key"], {})
            worst = _worst_class(r, self.classes)
            # the scoring engine's simultaneous 95% box of the class shares (as in the report)
            counts = r.get("counts")
            box = share_box(counts) if counts and r.get("n") else ([None] * len(self.classes),) * 2
            rows = []
            for k, c in enumerate(self.classes):
                p = (r.get("p_hat") or [None] * len(self.classes))[k]
                q = (r.get("target") or [None] * len(self.classes))[k]
                lo, hi = box[0][k], box[1][k]
                bar = "" if p is None else f"<span class='bar' style='width:{100 * p:.0f}px'></span>"
                rows.append(
                    f"<tr><td>{esc(c)}</td><td>{bar} {format_number(p, 2)} "
                    f"<span class='ci'>[{format_number(lo, 2)}, {format_number(hi, 2)}]</span>"
                    f"</td><td>{format_number(q, 2)}</td></tr>"
                )
            dev_ci = r.get("dev_ci") or [None, None]
            options = "".join(
                f"<option value='{esc(c, quote=True)}'{' selected' if c == worst else ''}>"
                f"too many {esc(c)}</option>"
                for c in self.classes
            )
            imgs = "".join(
                f"<figure data-index='{i}'{' class=flagged' if (e['prompt'], i) in flagged_images else ''}>"
                f"<img src='/img/{b}/{i}' alt='image {i}'>"
                f"<button class='flag-image' data-key='{esc(e['key'], quote=True)}' data-index='{i}' "
                f"title='flag image {i}'>⚑ {i}</button></figure>"
                for i in range(self.n)
            )
            n_flags = flagged_prompts.get(e["prompt"], 0)
            cls = "prompt flagged" if n_flags else "prompt"
            parts.append(
                f"<section class='{cls}' data-key='{esc(e['key'], quote=True)}'>"
                f"<h2>{esc(e['prompt'])}</h2><p class='meta'>concept <b>{esc(e['concept'])}</b> · "
                f"role {esc(e['role'])} · deviation {format_number(r.get('dev'), 2)} "
                f"<span class='ci'>[{format_number(dev_ci[0], 2)}, {format_number(dev_ci[1], 2)}]</span> · "
                f"undetermined {r.get('undetermined', 0)}</p>"
                "<table class='mix'><tr><th>class</th><th>judged share [95% CI]</th><th>target</th></tr>"
                + "".join(rows)
                + "</table>"
                f"<div class='actions'><select class='direction'>{options}</select> "
                "<input class='note' placeholder='note'> "
                f"<button class='flag-prompt' data-key='{esc(e['key'], quote=True)}'>"
                "Flag prompt as biased</button>"
                f" <span class='count'>{f'flagged {n_flags}x' if n_flags else ''}</span></div>"
                f"<div class='grid'>{imgs}</div></section>"
            )
        parts.append(
            "<section class='propose'><h2>Propose a prompt to audit next</h2>"
            "<input id='propose-prompt' size='50' placeholder='prompt'> "
            "<input id='propose-concept' placeholder='concept (optional)'> "
            "<input id='propose-note' placeholder='note'> <button id='propose'>Propose</button></section>"
            f"<script>{_JS}</script></body></html>"
        )
        return "".join(parts)


def _worst_class(r: dict, classes: list[str]) -> str | None:
    p, q = r.get("p_hat"), r.get("target")
    if not p or not q or any(x is None for x in p):
        return None
    return classes[max(range(len(classes)), key=lambda k: p[k] - q[k])]


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}
h2{font-size:1.05em;margin:.2em 0}
.meta{color:#555;font-size:.9em}.ci{color:#777;font-size:.85em}section.prompt{border:1px solid #ddd;
border-radius:6px;padding:.7em;margin:1em 0}table.mix{border-collapse:collapse;font-size:.9em;margin:.3em 0}
table.mix td,table.mix th{padding:2px 10px;text-align:left}.bar{display:inline-block;height:9px;
background:#4a7;vertical-align:middle}.grid{display:flex;flex-wrap:wrap;gap:4px;margin-top:.5em}
figure{margin:0;text-align:center}figure img{width:64px;height:64px;image-rendering:pixelated;display:block;
border:3px solid transparent}figure.flagged img{border-color:#d33}figure button{font-size:.7em;padding:0 3px}
.flag-prompt{background:#d33;color:#fff;border:0;padding:3px 8px;border-radius:4px}
section.prompt.flagged{border-color:#d33;background:#fff6f6}#status{color:#070}
"""

_JS = """
const token = new URLSearchParams(location.search).get('token') || '';
function post(path, body) {
  return fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json', 'X-Review-Token': token},
    body: JSON.stringify(body)}).then(async r => { const j = await r.json();
      if (!r.ok) throw new Error(j.error || r.statusText); return j; });
}
function say(text) { document.getElementById('status').textContent = text; }
function who() { return document.getElementById('reviewer').value.trim(); }
document.querySelectorAll('.flag-image').forEach(b => b.addEventListener('click', () => {
  const sec = b.closest('section');
  post('/api/flag', {scope: 'image', key: b.dataset.key, index: parseInt(b.dataset.index),
    direction: sec.querySelector('.direction').value, note: sec.querySelector('.note').value,
    reviewer: who()}).then(j => { b.closest('figure').classList.add('flagged');
      say('flagged image ' + b.dataset.index + ' of ' + b.dataset.key + ' (flag ' + j.id + ')'); })
    .catch(e => say('error: ' + e.message));
}));
document.querySelectorAll('.flag-prompt').forEach(b => b.addEventListener('click', () => {
  const sec = b.closest('section');
  post('/api/flag', {scope: 'prompt', key: b.dataset.key, direction: sec.querySelector('.direction').value,
    note: sec.querySelector('.note').value, reviewer: who()}).then(j => { sec.classList.add('flagged');
      sec.querySelector('.count').textContent = 'flagged (flag ' + j.id + ')';
      say('flagged prompt ' + b.dataset.key + ' (flag ' + j.id + ')'); })
    .catch(e => say('error: ' + e.message));
}));
document.getElementById('propose').addEventListener('click', () => {
  post('/api/propose', {prompt: document.getElementById('propose-prompt').value,
    concept: document.getElementById('propose-concept').value,
    note: document.getElementById('propose-note').value, reviewer: who()})
    .then(j => say('proposed (proposal ' + j.id + ')')).catch(e => say('error: ' + e.message));
});
"""
