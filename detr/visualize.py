"""Pictures and a page of what `detr.analysis` computes: heatmap grids and one HTML file.

`write_inspection(maps, out)` writes, atomically and only once everything is rendered:

    cross_attention.png           layers × heads heatmaps, target tokens (rows) × source tokens
    encoder_self_attention.png    source × source
    decoder_self_attention.png    target × target (zero above the diagonal: the causal mask)
    index.html                    self-contained: pick output, kind, layer and head; hover a target
                                  token to shade the source by attention and by saliency
    attention.json                the raw numbers
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from detr.analysis import AttentionMaps, attention_maps, label_maps
from detr.config import DecodeConfig
from detr.errors import DataError
from detr.labeller import Classifier, Tagger
from detr.translator import Translator


def plot_grid(weights: Tensor, rows: list[str], cols: list[str], title: str, path: Path) -> None:
    """One heatmap per (layer, head) of `weights` (L, H, rows, cols), tokens as axis labels."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    L, H = weights.shape[:2]
    cell = min(max(2.2, 0.22 * max(len(rows), len(cols))), 12.0)  # inches per heatmap
    fig = Figure(figsize=(cell * H + 1, cell * L + 1), layout="constrained")
    axes = fig.subplots(L, H, squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=8)
            for axis, labels, rotation in ((ax.xaxis, cols, 90), (ax.yaxis, rows, 0)):
                every = -(-len(labels) // 60)  # at most 60 labels per axis stay readable
                ticks = range(0, len(labels), every)
                axis.set_ticks(ticks, [labels[i] for i in ticks], rotation=rotation, fontsize=6)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)


def inspect(predictor: Translator | Classifier | Tagger, src_text: str, out: str | Path, ref_text: str | None = None,
            options: DecodeConfig | None = None) -> list[Path]:
    """Attention of every layer and head and saliency for one sentence, written to `out`.

    Args:
        predictor: a `Translator` (encoder, decoder and cross-attention; saliency per output
            token), a `Classifier` or a `Tagger` (encoder self-attention; saliency for the
            predicted label, or for each word's predicted tag).
        ref_text: translation only: inspect this reference output; without it, the n-best
            outputs of the search that `options` describe (default: the run's decode settings).

    Raises:
        DataError: an empty `src_text` or an unwritable `out`.
    """
    if not src_text.strip():
        raise DataError("--src is empty: give the sentence to inspect")
    if ref_text is not None and not ref_text.strip():
        raise DataError("--ref is empty: give the reference output, or leave --ref out to decode")
    if isinstance(predictor, Translator):
        n_tokens, limit = len(predictor.tokenizer.src.encode(src_text)) + 1, predictor.max_src_len
        maps = attention_maps(predictor, src_text, ref_text, options=options)
    else:
        if ref_text is not None:
            raise DataError("--ref applies to translation runs; a classify/tag run shows its own prediction")
        n_tokens, limit = len(predictor.text.sentence(src_text)[0]), predictor.text.max_len
        maps = label_maps(predictor, src_text)
    note = ""
    if n_tokens > limit:
        note = f"The input has {n_tokens} tokens; only the first {limit} (the model's maximum) were used."
    return write_inspection(maps, out, note)


def write_inspection(maps: list[AttentionMaps], out: str | Path, note: str = "") -> list[Path]:
    """Render `maps` (one per output; the first is plotted) into the folder `out`.

    Files appear in `out` only when all of them were written (rendered in a temporary folder
    beside it first), so an interrupted run leaves no half-written inspection.

    Raises:
        DataError: `out` cannot be created or written.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".inspect-", dir=out))
    except OSError as err:
        raise DataError(f"{out}: cannot write the inspection there: {err.strerror or err}") from None
    try:
        first = maps[0]
        plots = [("encoder_self_attention.png", first.encoder, first.src_tokens, first.src_tokens,
                  "encoder self-attention")]
        if first.cross is not None:
            plots += [("cross_attention.png", first.cross, first.tgt_tokens, first.src_tokens,
                       "cross-attention (rows: output, columns: source)"),
                      ("decoder_self_attention.png", first.decoder_self, first.tgt_tokens, first.tgt_tokens,
                       "decoder self-attention (causal)")]
        for name, weights, rows, cols, title in plots:
            plot_grid(weights, rows, cols, title, tmp / name)
        data = {"note": note, "outputs": [m.to_dict() for m in maps]}
        (tmp / "attention.json").write_text(json.dumps(data), encoding="utf-8")
        (tmp / "index.html").write_text(html_page(data), encoding="utf-8")
        written = []
        for name in [p[0] for p in plots] + ["index.html", "attention.json"]:
            (tmp / name).replace(out / name)
            written.append(out / name)
        return written
    except OSError as err:
        raise DataError(f"{out}: cannot write the inspection there: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def html_page(data: dict) -> str:
    """One self-contained page (inline data, style and script; nothing fetched from the network)."""
    # No "<", ">" or "&" reaches the page raw: text such as "</script>" or "<!--" in a sentence
    # cannot end the data's <script> element or open a comment; JSON.parse reads the escapes back.
    payload = json.dumps(data).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return _PAGE.replace("__DATA__", payload)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>detr inspect</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
 .tok { display: inline-block; padding: 2px 4px; margin: 1px; border-radius: 3px; cursor: default;
        border: 1px solid #ddd; font-family: monospace; }
 .tgt .tok:hover, .tok.active { outline: 2px solid #d33; }
 table.heat { border-collapse: collapse; font-family: monospace; font-size: 11px; }
 table.heat td, table.heat th { border: 1px solid #eee; padding: 1px 3px; min-width: 14px; }
 table.heat th.col { writing-mode: vertical-rl; transform: rotate(180deg); }
 label { margin-right: 1em; } .note { color: #a60; } .row { margin: .6em 0; }
</style></head>
<body data-ready="no">
<h2>detr inspect</h2>
<div class="note" id="note"></div>
<div class="row">
 <label>output <select id="output"></select></label>
 <label>attention <select id="kind">
   <option value="cross">cross (output → source)</option>
   <option value="encoder">encoder self</option>
   <option value="decoder_self">decoder self</option></select></label>
 <label>layer <select id="layer"></select></label>
 <label>head <select id="head"></select></label>
</div>
<div class="row" id="srcrow">source (shaded by attention of the hovered output token):<div id="src"></div></div>
<div class="row">saliency (gradient × input for the hovered output token or label):<div id="sal"></div></div>
<div class="row tgt">output or predicted label(s) (hover one):<div id="tgt"></div></div>
<div class="row"><table class="heat" id="heat"></table></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
function option(select, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text; select.appendChild(o);
}
function current() { return DATA.outputs[Number($("output").value)]; }
function matrix(kind, layer, head) {
  // weights [L][H][rows][cols]; "mean" averages over that axis.
  const w = current()[kind];
  const layers = layer === "mean" ? w.map((_, i) => i) : [Math.min(Number(layer), w.length - 1)];
  let out = null, n = 0;
  for (const l of layers) {
    const heads = head === "mean" ? w[l].map((_, i) => i) : [Number(head)];
    for (const h of heads) {
      const m = w[l][h];
      if (out === null) out = m.map((r) => r.map(() => 0));
      m.forEach((r, i) => r.forEach((v, j) => { out[i][j] += v; }));
      n += 1;
    }
  }
  return out.map((r) => r.map((v) => v / n));
}
function shade(v, max) {
  const a = max > 0 ? Math.min(1, v / max) : 0;
  return "rgba(30, 110, 220, " + a.toFixed(3) + ")";
}
function tokens(container, labels, values) {
  container.innerHTML = "";
  const max = values ? Math.max(...values) : 0;
  labels.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok"; span.textContent = t;
    if (values) { span.style.background = shade(values[i], max); span.title = values[i].toFixed(4); }
    container.appendChild(span);
  });
  return container.children;
}
function axes(kind) {
  const o = current();
  if (kind === "cross") return [o.tgt_tokens, o.src_tokens];
  if (kind === "encoder") return [o.src_tokens, o.src_tokens];
  return [o.tgt_tokens, o.tgt_tokens];
}
function drawHeat() {
  const kind = $("kind").value, m = matrix(kind, $("layer").value, $("head").value);
  const [rows, cols] = axes(kind), table = $("heat");
  table.innerHTML = "";
  const head = table.insertRow(); head.appendChild(document.createElement("th"));
  cols.forEach((c) => { const th = document.createElement("th"); th.className = "col"; th.textContent = c;
                        head.appendChild(th); });
  m.forEach((r, i) => {
    const tr = table.insertRow(); const th = document.createElement("th"); th.textContent = rows[i];
    tr.appendChild(th);
    r.forEach((v) => { const td = tr.insertCell(); td.style.background = shade(v, 1); td.title = v.toFixed(4); });
  });
}
function drawTokens() {
  const o = current();
  tokens($("src"), o.src_tokens, null);
  tokens($("sal"), o.src_tokens, null);
  const spans = tokens($("tgt"), o.tgt_tokens, null);
  Array.from(spans).forEach((span, t) => span.addEventListener("mouseenter", () => {
    Array.from(spans).forEach((s) => s.classList.remove("active")); span.classList.add("active");
    if (o.cross) tokens($("src"), o.src_tokens, matrix("cross", $("layer").value, $("head").value)[t]);
    tokens($("sal"), o.src_tokens, o.saliency[t]);
  }));
  if (spans.length) spans[0].dispatchEvent(new Event("mouseenter"));  // show the first at once
}
function setup() {
  $("note").textContent = DATA.note || "";
  DATA.outputs.forEach((o, i) => option($("output"), i,
    (i + 1) + ". " + o.output + (o.score === null ? " (reference)" : " (" + o.score.toFixed(3) + ")")));
  if (!DATA.outputs[0].cross) {  // a classify/tag run: only the encoder attends
    Array.from($("kind").options).forEach((opt) => { if (opt.value !== "encoder") opt.remove(); });
    $("srcrow").style.display = "none";
  }
  const first = DATA.outputs[0].cross || DATA.outputs[0].encoder;
  const L = first.length, H = first[0].length;
  option($("layer"), "mean", "mean"); for (let l = 0; l < L; l++) option($("layer"), l, String(l + 1));
  option($("head"), "mean", "mean"); for (let h = 0; h < H; h++) option($("head"), h, String(h + 1));
  $("layer").value = String(L - 1);
  for (const id of ["output", "kind", "layer", "head"]) {
    $(id).addEventListener("change", () => { drawTokens(); drawHeat(); });
  }
  drawTokens(); drawHeat();
  document.body.dataset.ready = "yes";
}
window.addEventListener("error", (e) => { document.body.dataset.error = String(e.message); });
setup();
</script>
</body></html>
"""
