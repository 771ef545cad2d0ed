"""The page at `/`: type text, pick a model, see its output and (translation) the cross-attention;
with an assistant served, a chat box.

One self-contained HTML file: inline style and script, nothing fetched but the server's own
API. Every piece of text reaches the page through `textContent`, never as markup.
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>detr</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 70em; }
 textarea { width: 100%; height: 5em; font-size: 1em; }
 button { font-size: 1em; padding: .3em 1.2em; }
 .row { margin: .7em 0; } label { margin-right: 1em; }
 #out { font-size: 1.15em; white-space: pre-wrap; min-height: 1.5em; }
 .err { color: #b00; } .muted { color: #777; }
 .tok { display: inline-block; padding: 2px 5px; margin: 1px; border: 1px solid #ddd; border-radius: 3px;
        font-family: monospace; cursor: default; }
 #tgt .tok:hover { outline: 2px solid #d33; }
 .q { font-weight: 600; margin-top: .6em; } .a { margin-left: 1em; white-space: pre-wrap; }
 .handoff { color: #a60; } .fb { font-size: .8em; padding: 0 .5em; margin-left: .5em; }
 table.heat { border-collapse: collapse; font-family: monospace; font-size: 11px; }
 table.heat td, table.heat th { border: 1px solid #eee; padding: 2px 4px; min-width: 16px; }
 table.heat th.col { writing-mode: vertical-rl; transform: rotate(180deg); }
</style></head>
<body data-state="loading">
<h2>detr</h2>
<div class="row">
 <label>model <select id="model"></select></label>
 <label>API key <input id="key" type="password" size="24" placeholder="if the server asks for one"></label>
 <span id="task" class="muted"></span>
</div>
<div class="row"><textarea id="src" placeholder="Type or paste text, one input per line"></textarea></div>
<div class="row"><button id="go">Run</button> <span id="status" class="muted"></span></div>
<div class="row" id="out"></div>
<div id="attn" hidden>
 <div class="row"><label>layer <select id="layer"></select></label><label>head <select id="head"></select></label>
  <span class="muted">hover an output token: the source tokens it attends to are shaded</span></div>
 <div class="row">source: <span id="srcToks"></span></div>
 <div class="row" id="tgt">output: <span id="tgtToks"></span></div>
 <div class="row"><table class="heat" id="heat"></table></div>
</div>
<div id="assist" hidden>
 <h3>Assistant</h3>
 <div class="row" id="chat"></div>
 <div class="row"><input id="ask" size="70" placeholder="Ask a question"> <button id="askGo">Ask</button>
  <span id="askStatus" class="muted"></span></div>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let MODELS = {}, MAPS = null;

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function call(path, body) {
  const r = await fetch(path, body === undefined ? {headers: headers()}
                                                 : {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
  return data;
}
function option(select, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text; select.appendChild(o);
}
function shade(v) { return "rgba(200,30,30," + Math.min(1, v).toFixed(3) + ")"; }
function tokens(container, list, values) {
  container.textContent = "";
  list.forEach((t, i) => {
    const s = document.createElement("span"); s.className = "tok"; s.textContent = t;
    if (values) s.style.background = shade(values[i]);
    container.appendChild(s);
  });
  return container.children;
}
function grid() {
  const m = MAPS, L = +$("layer").value, H = +$("head").value, w = m.cross[L][H];
  tokens($("srcToks"), m.src_tokens);
  Array.from(tokens($("tgtToks"), m.tgt_tokens)).forEach((el, i) => {
    el.addEventListener("mouseenter", () => tokens($("srcToks"), m.src_tokens, w[i]));
  });
  const table = $("heat"); table.textContent = "";
  const head = table.insertRow(); head.appendChild(document.createElement("th"));
  m.src_tokens.forEach((c) => { const th = document.createElement("th"); th.className = "col"; th.textContent = c;
                                head.appendChild(th); });
  w.forEach((row, i) => {
    const tr = table.insertRow(); const th = document.createElement("th"); th.textContent = m.tgt_tokens[i];
    tr.appendChild(th);
    row.forEach((v) => { const td = tr.insertCell(); td.style.background = shade(v); td.title = v.toFixed(3); });
  });
}
async function run() {
  const model = $("model").value, info = MODELS[model], texts = $("src").value.split("\\n").filter((t) => t.trim());
  if (!texts.length) { $("status").textContent = "type something first"; return; }
  document.body.dataset.state = "working"; $("status").textContent = "…"; $("out").textContent = "";
  $("out").classList.remove("err"); $("attn").hidden = true;
  try {
    let lines;
    if (info.task === "translate") {
      const r = await call("/v1/translate", {model, texts});
      lines = r.translations;
      const m = await call("/v1/inspect", {model, text: texts[0], reference: r.translations[0] || null});
      MAPS = m.outputs[0];
      if (MAPS.cross && MAPS.tgt_tokens.length) {
        $("layer").textContent = ""; $("head").textContent = "";
        MAPS.cross.forEach((_, i) => option($("layer"), i, i + 1));
        MAPS.cross[0].forEach((_, i) => option($("head"), i, i + 1));
        $("layer").value = MAPS.cross.length - 1; $("attn").hidden = false; grid();
      }
    } else if (info.task === "classify") {
      const r = await call("/v1/classify", {model, texts, probs: true});
      lines = r.labels.map((l, i) => l + "   " + Object.entries(r.probabilities[i])
                                            .map(([k, p]) => k + " " + p.toFixed(3)).join("  "));
    } else {
      const r = await call("/v1/tag", {model, texts});
      lines = r.tags.map((pairs) => pairs.map((p) => p.word + "/" + p.tag).join(" "));
    }
    $("out").textContent = lines.join("\\n"); $("status").textContent = "";
    document.body.dataset.state = "done";
  } catch (e) {
    $("out").textContent = e.message; $("out").classList.add("err"); $("status").textContent = "";
    document.body.dataset.state = "error";
  }
}
const SESSION = Math.random().toString(36).slice(2, 14);
async function ask() {
  const question = $("ask").value;
  if (!question.trim()) { $("askStatus").textContent = "type a question first"; return; }
  document.body.dataset.chat = "working"; $("askStatus").textContent = "…";
  try {
    const r = await call("/v1/assist", {question, session: SESSION});
    const q = document.createElement("div"); q.className = "q"; q.textContent = question;
    const a = document.createElement("div"); a.className = "a " + r.source; a.textContent = r.answer;
    const meta = document.createElement("span"); meta.className = "muted";
    meta.textContent = "  [" + r.source + ", " + r.confidence.toFixed(2) + "]"; a.appendChild(meta);
    ["good", "bad"].forEach((value) => {
      const b = document.createElement("button"); b.className = "fb"; b.textContent = value;
      b.addEventListener("click", async () => { await call("/v1/assist/feedback", {id: r.id, feedback: value});
                                                b.disabled = true; });
      a.appendChild(b);
    });
    $("chat").appendChild(q); $("chat").appendChild(a);
    $("ask").value = ""; $("askStatus").textContent = ""; document.body.dataset.chat = "done";
  } catch (e) {
    $("askStatus").textContent = e.message; document.body.dataset.chat = "error";
  }
}
async function start() {
  try {
    const r = await call("/v1/models");
    r.models.forEach((m) => { MODELS[m.name] = m; option($("model"), m.name, m.name + " (" + m.task + ")"); });
    const show = () => { const t = MODELS[$("model").value].task;
      $("go").textContent = {translate: "Translate", classify: "Classify", tag: "Tag"}[t]; };
    $("model").addEventListener("change", show); show();
    $("assist").hidden = !r.assistant;
    document.body.dataset.state = "ready";
  } catch (e) {
    $("status").textContent = e.message + " (enter the API key, then reload)"; document.body.dataset.state = "error";
  }
}
$("go").addEventListener("click", run);
$("askGo").addEventListener("click", ask);
$("ask").addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });
$("layer").addEventListener("change", grid); $("head").addEventListener("change", grid);
$("key").addEventListener("change", () => { if (!Object.keys(MODELS).length) start(); });
start();
</script>
</body></html>
"""
