"""The report's HTML: plain HTML and CSS in one file, pictures embedded as data URIs.

``?check=1`` in the page URL makes a small script write, once the page has loaded, a JSON
summary (images loaded, rows per table, the tag of the element the URL's ``#fragment``
names) into ``<pre id="check">`` and the title; the
headless-browser test reads it back. Without the flag the script does nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from ..aggregate import BAD_SAMPLE, UNIT_SAMPLE
from .data import DIRECTION, RunData, fmt
from .gallery import ModelGallery, sample_anchor

MAX_ERROR_ROWS = 1000
MAX_CLASSES = 100  # rows of the per-class table per model (the classes with most rows)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
 color:#1d232a;background:#f6f7f9}
header{background:#1f2a37;color:#fff;padding:14px 28px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:2px 0;color:#cfd8e3}
nav a{color:#9cc9ff;margin-right:14px;text-decoration:none} nav a:hover{text-decoration:underline}
main{padding:6px 28px 40px} section{margin-top:22px}
h2{font-size:18px;border-bottom:2px solid #d5dbe3;padding-bottom:4px} h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px}
th,td{border:1px solid #d5dbe3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700;background:#eaf7ea} .ci{color:#66707c;font-size:11px;white-space:nowrap}
.note{color:#5a6470;font-size:13px} .warn{color:#9a3b00}
pre{background:#fff;border:1px solid #d5dbe3;padding:10px;overflow:auto;font-size:12px}
table.gallery{width:100%;table-layout:fixed}
table.gallery td{padding:4px;text-align:center;font-size:11px;color:#3a444f;overflow-wrap:anywhere}
table.gallery img{display:block;width:100%;max-width:480px;height:auto;margin:0 auto 3px;border-radius:2px}
table.gallery td.photo{background:#fafbfc} .sid{font-weight:600;color:#1d232a;word-break:break-all}
.err{color:#b00020;font-size:12px;max-width:220px;white-space:normal}
.legend span{display:inline-block;margin-right:16px;vertical-align:middle}
.swatch{display:inline-block;width:18px;height:10px;border:2px solid;margin-right:4px;vertical-align:middle}
img.chart{max-width:100%;background:#fff;border:1px solid #d5dbe3}
.scroll{overflow-x:auto} #summary-table{font-size:13px} #summary-table th{font-size:12px}
#summary-table td,#summary-table th{padding:3px 6px}
td.msg{max-width:760px;white-space:pre-wrap;word-break:break-word}
.pager a,.pager b{margin-right:8px} .pager{margin:8px 0}
"""

CHECK_SCRIPT = """
(function () {
  if (!new URLSearchParams(location.search).has('check')) return;
  window.addEventListener('load', function () {
    var imgs = Array.prototype.slice.call(document.images);
    var tables = {};
    document.querySelectorAll('table[id]').forEach(function (t) {
      tables[t.id] = t.querySelectorAll('tbody tr').length;
    });
    var r = {images: imgs.length,
             loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
             tables: tables,
             sections: Array.prototype.map.call(document.querySelectorAll('section[id]'),
                                                function (s) { return s.id; })};
    r.all_loaded = r.images > 0 && r.loaded === r.images;
    var hit = location.hash ? document.getElementById(decodeURIComponent(location.hash.slice(1))) : null;
    r.hash_target = hit ? hit.tagName.toLowerCase() : null;
    var pre = document.createElement('pre');
    pre.id = 'check';
    pre.textContent = JSON.stringify(r);
    document.body.appendChild(pre);
    document.title = 'check ' + JSON.stringify(r);
  });
})();
"""


def _when(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "–"


def _arrow(metric: str) -> str:
    d = DIRECTION.get(metric, 0)
    return " ↑" if d > 0 else (" ↓" if d < 0 else "")


def header(data: RunData, generated_s: float | None = None) -> str:
    m = data.manifest
    rows = sum(u.n_rows for u in data.units)
    errors = sum(u.n_errors for u in data.units)
    status = m.get("status", "unknown (no manifest)")
    return (
        f"<header><h1>salmap report · {escape(str(m.get('run_id', data.uri)))}</h1>"
        f"<p>{escape(data.uri)} · status <b>{escape(str(status))}</b> · "
        f"{len(data.units)} unit(s) · {rows} committed row(s) · {errors} error row(s) · "
        f"{m.get('shards_total', len(m.get('shards') or []))} shard(s)</p>"
        f"<p>started {_when(m.get('started'))} · finished {_when(m.get('finished'))}</p>"
        "<nav><a href='#summary'>Summary</a><a href='#actors'>Actors</a><a href='#gallery'>Gallery</a>"
        "<a href='#labels'>Pseudo-labels</a><a href='#per-class'>Per class</a><a href='#curves'>Curves</a>"
        "<a href='#distributions'>Distributions</a><a href='#errors'>Errors</a>"
        "<a href='#config'>Config</a></nav></header>"
    )


def summary_section(data: RunData) -> str:
    metrics = data.metrics
    head = "".join(f"<th>{escape(m).replace('_', '_<wbr>')}{_arrow(m)}</th>" for m in metrics)
    best: dict[tuple[str, str], set[str]] = {}
    for model in data.models():
        units = [u for u in data.units if u.model == model]
        for m in metrics:
            d = DIRECTION.get(m, 0)
            means = {u.id: (u.summary.get(m) or {}).get("mean") for u in units}
            means = {k: float(v) for k, v in means.items() if v is not None and np.isfinite(float(v))}
            if d and len(means) > 1:
                top = max(means.values()) if d > 0 else min(means.values())
                best[(model, m)] = {k for k, v in means.items() if v == top}
    body = []
    for u in data.units:
        info = u.info
        rate = info.get("images_per_s")
        cells = [f"<td>{escape(u.model)}</td><td>{escape(u.method)}</td>",
                 f"<td class=num>{u.n_rows}</td>",
                 f"<td class=num>{u.n_errors}</td>",
                 f"<td class=num>{fmt(rate, 2)}</td><td class=num>{fmt(info.get('elapsed_s'), 1)}</td>"]
        for m in metrics:
            s = u.summary.get(m) or {}
            scale, unit, digits = (100.0, "%", 1) if m == "pointing_hit" else (1.0, "", 3)
            mean = s.get("mean")
            cls = "num best" if u.id in best.get((u.model, m), ()) else "num"
            if mean is None or not np.isfinite(float(mean)):
                cells.append(f"<td class='{cls}'>–</td>")
                continue
            lo, hi = s.get("ci_low"), s.get("ci_high")
            ci = (f"<br><span class=ci>[{fmt(_mul(lo, scale), digits)}, "
                  f"{fmt(_mul(hi, scale), digits)}]</span>"
                  if lo is not None and hi is not None else "")
            where = "manifest" if s.get("from_manifest") else "rows"
            normal = s.get("ci") == "normal"
            how = "normal interval" if normal else "bootstrap interval"
            cells.append(f"<td class='{cls}' title='n={escape(str(s.get('n', '?')))}, from the {where}, "
                         f"{how}'>{fmt(float(mean) * scale, digits)}{unit}{ci}"
                         f"{'*' if normal else ''}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    missing = [u for u in data.units if u.read_error]
    notes = "".join(f"<p class='note warn'>{escape(u.id)}: {escape(u.read_error)}</p>" for u in missing)
    not_computed = [c for c in DIRECTION if c not in metrics]
    return (
        "<section id=summary><h2>Summary per unit</h2>"
        "<p class=note>Mean and 95% interval [low, high] of each metric over the rows with a value: "
        "the run's manifest summary where it has one, else computed here from the units' "
        "aggregates in the commit records; ↑ higher is better, ↓ lower is better; "
        "the best mean per model is highlighted. pointing_hit is the hit rate in %. "
        "Means are over every row; the interval is the percentile bootstrap while a unit has at "
        f"most {UNIT_SAMPLE} samples, else (marked *) the normal interval mean ± 1.96·sd/√n "
        "from the exact sums.</p>"
        "<div class=scroll><table id=summary-table><thead><tr><th>model</th><th>method</th><th>rows</th><th>errors</th>"
        f"<th>images/s</th><th>elapsed s</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        + (f"<p class=note>Not computed in this run: {escape(', '.join(not_computed))}.</p>"
           if not_computed else "") + notes + "</section>"
    )


def actors_section(data: RunData) -> str:
    """Actors per unit and device-seconds (the manifest's actor accounting)."""
    cluster = data.manifest.get("cluster") or {}
    body = []
    for u in data.units:
        a = u.info.get("actors") or {}
        if not a:
            continue
        pool = a.get("pool")
        pool_s = f"{pool[0]}–{pool[1]}" if isinstance(pool, list) else str(pool or "–")
        busy = (a["busy_device_s"] / a["device_s"] * 100.0
                if a.get("device_s") and a.get("busy_device_s") is not None else None)
        devices = ", ".join(f"{k}: {v}" for k, v in sorted((a.get("devices") or {}).items()))
        body.append(
            f"<tr><td>{escape(u.model)}</td><td>{escape(u.method)}</td>"
            f"<td class=num>{escape(pool_s)}</td><td class=num>{_fixed(a.get('share'), 2)}</td>"
            f"<td class=num>{_fixed(a.get('cost_per_image'), 2)}</td>"
            f"<td class=num>{_fixed(a.get('actors'), 0)}</td><td class=num>{_fixed(a.get('peak'), 0)}</td>"
            f"<td class=num>{_fixed(a.get('device_s'), 1)}</td><td class=num>{_fixed(busy, 0)}</td>"
            f"<td class=num>{_fixed(a.get('busy_s_per_image'), 3)}</td>"
            f"<td>{escape(devices)}</td></tr>")
    if not body:
        return ("<section id=actors><h2>Actors per unit</h2><p class=note>This run's manifest "
                "has no actor accounting.</p></section>")
    resource = escape(str(cluster.get("resource", "device")))
    head = (f"<p class=note>{_fixed(cluster.get('slots'), 0)} actor slot(s) of "
            f"{_fixed(cluster.get('per_actor'), 2)} {resource} each; "
            f"{_fixed(cluster.get('units_in_parallel'), 0)} unit(s) at once; at most "
            f"{_fixed(cluster.get('peak_actors'), 0)} actor(s) alive at once in the last driver. "
            "Pool: fixed size, or min–max of an autoscaling pool (min = the unit's share of the "
            "slots in proportion to its expected work); cost: declared work per image in "
            f"forward+backward passes; device-s: each actor's time alive x the {resource}s it "
            "holds; busy: the part of it inside batches.</p>" if cluster else "")
    return (
        "<section id=actors><h2>Actors per unit</h2>" + head +
        "<table id=actors-table><thead><tr><th>model</th><th>method</th><th>pool</th>"
        "<th>share</th><th>cost / image (F+B)</th><th>actors</th><th>peak</th><th>device-s</th>"
        "<th>busy %</th><th>busy s / image</th><th>devices</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _fixed(value: Any, digits: int) -> str:
    """A number with fixed digits (no exponent, thousands separated), '–' when missing."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if v != v else f"{v:,.{digits}f}"


def label_quality_section(data: RunData, names: Any = None) -> str:
    """Pseudo-label quality per unit (box precision / recall, label-map mIoU and coverage),
    with a per-class table each; ``names(model)`` gives a class-name function."""
    units = [u for u in data.units if u.label_quality]
    head = ("<section id=labels><h2>Pseudo-label quality</h2>")
    if not units:
        return (head + "<p class=note>No ground truth to score the pseudo-labels against: box "
                "quality needs the <code>pseudo_box</code> metric and <code>.json</code> boxes in "
                "the shards; label-map quality needs <code>pseudo_labels.label_maps: true</code> "
                "and ground-truth masks (<code>input.mask_key</code>, e.g. "
                "<code>seg.png</code>).</p></section>")
    cols = [("boxes", "precision", "box precision"), ("boxes", "recall", "box recall"),
            ("boxes", "precision_class_mean", "precision, class mean"),
            ("boxes", "recall_class_mean", "recall, class mean"),
            ("masks", "miou", "label-map mIoU"), ("masks", "miou_foreground", "mIoU w/o background"),
            ("masks", "coverage", "coverage")]
    best: dict[tuple[str, str, str], float] = {}
    for u in units:
        for part, key, _ in cols:
            v = ((u.label_quality or {}).get(part) or {}).get(key)
            if v is not None and key != "coverage":
                k = (u.model, part, key)
                best[k] = max(best.get(k, v), v)
    rows = []
    for u in units:
        q = u.label_quality or {}
        cells = [f"<td>{escape(u.model)}</td><td>{escape(u.method)}</td>"]
        for part, key, _ in cols:
            v = (q.get(part) or {}).get(key)
            top = v is not None and sum(1 for w in units if w.model == u.model) > 1 and \
                best.get((u.model, part, key)) == v
            cells.append(f"<td class='num{' best' if top else ''}'>{fmt(v)}</td>")
        b, m = q.get("boxes") or {}, q.get("masks") or {}
        cells.append(f"<td class=num>{b.get('gt_boxes', '–')}</td>"
                     f"<td class=num>{m.get('images', '–')}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    iou = next(((u.label_quality or {}).get("boxes") or {}).get("iou") for u in units)
    th = "".join(f"<th>{escape(label)}</th>" for _, _, label in cols)
    out = [head,
           "<p class=note>Scored against the ground truth the shards carry. Boxes: a pseudo box "
           f"is correct when its IoU with a ground-truth box of its class is at least "
           f"{fmt(iou, 2) if iou is not None else '0.5'}; precision over the pseudo boxes made on "
           "annotated images, recall over the ground-truth boxes of the explained classes. Label "
           "maps: intersection and union per class summed over the dataset, over the pixels "
           "neither side ignores (background counts as a class); coverage is the share of "
           "ground-truth pixels the label maps do not ignore. The best value per model is "
           "highlighted.</p>",
           "<div class=scroll><table id=label-quality-table><thead><tr><th>model</th>"
           f"<th>method</th>{th}<th>ground-truth boxes</th><th>images with masks</th></tr>"
           f"</thead><tbody>{''.join(rows)}</tbody></table></div>"]
    for u in units:
        out.append(_per_class(u, names(u.model) if names else (lambda c: f"class_{c}")))
    out.append("</section>")
    return "".join(out)


def _per_class(u: Any, name: Any) -> str:
    q = u.label_quality or {}
    boxes = (q.get("boxes") or {}).get("per_class") or {}
    masks = (q.get("masks") or {}).get("per_class") or {}
    classes = sorted({int(c) for c in (*boxes, *masks)})
    body = []
    for c in classes:
        b, m = boxes.get(str(c)) or {}, masks.get(str(c)) or {}
        label = "background" if c == -1 else name(c)
        body.append(f"<tr><td class=num>{c if c >= 0 else '–'}</td><td>{escape(str(label))}</td>"
                    f"<td class=num>{fmt(b.get('precision'))}</td>"
                    f"<td class=num>{fmt(b.get('recall'))}</td>"
                    f"<td class=num>{b.get('tp', '–')} / {b.get('pseudo_boxes', '–')} / "
                    f"{b.get('gt_boxes', '–')}</td><td class=num>{fmt(m.get('iou'))}</td></tr>")
    return (f"<details><summary>{escape(u.id)}: per class ({len(classes)})</summary>"
            "<table class=label-classes><thead><tr><th>class</th><th>name</th><th>box precision</th>"
            "<th>box recall</th><th>matched / pseudo / ground-truth boxes</th><th>mask IoU</th>"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></details>")


def _mul(v: Any, k: float) -> float | None:
    return None if v is None else float(v) * k


def _pager(n_pages: int, current: int | None) -> str:
    """Links to the gallery pages (``current``: this page's number, None on the index)."""
    if n_pages == 0:
        return ""
    links = []
    if current is not None:
        links.append("<a href='index.html#gallery'>index</a>")
    for k in range(1, n_pages + 1):
        links.append(f"<b>{k}</b>" if k == current else f"<a href='{page_name(k)}'>{k}</a>")
    return f"<p class=pager>Every sample, ranked, page by page: {' '.join(links)}</p>"


def page_name(k: int) -> str:
    """The file name of gallery page ``k`` (1-based), next to index.html."""
    return f"gallery-{k:04d}.html"


def _legend(galleries: list[ModelGallery], legends: dict[str, str], cmap: str,
            signed: str) -> str:
    any_signed = any(any(g.signed.values()) for g in galleries)
    any_plain = any(not all(g.signed.values()) for g in galleries if g.signed)
    spans = []
    if any_plain or not any_signed or signed == "abs":
        spans.append(f"<span><img src='{legends['sequential']}' alt='{escape(cmap)} colour bar' "
                     f"width=160 height=10> low → high ({escape(cmap)}, the top 1% of "
                     "pixels saturate"
                     + (", signed maps: |value|" if any_signed and signed == "abs" else "")
                     + ")</span>")
    if any_signed and signed == "diverging":
        spans.append(f"<span><img src='{legends['diverging']}' alt='diverging colour bar' "
                     "width=160 height=10> signed maps: negative ← 0 → positive (the top 1% "
                     "of |value| saturates)</span>")
    spans += ["<span><i class=swatch style='border-color:#fff;background:#333'></i>pseudo box</span>",
              "<span><i class=swatch style='border-color:#00e63c'></i>ground-truth box of the target</span>",
              "<span><i class=swatch style='border-color:#c8c8c8;border-style:dashed'></i>"
              "model input crop</span>"]
    return f"<p class='note legend'>{''.join(spans)}</p>"


def gallery_section(galleries: list[ModelGallery], rank_label: str, legends: dict[str, str],
                    cmap: str, photo_problems: list[str], n_pages: int = 0,
                    current: int | None = None, signed: str = "diverging",
                    capped: str = "") -> str:
    out = ["<section id=gallery><h2>Gallery</h2>"]
    if not galleries:
        out.append("<p class=note>No rows to show.</p></section>")
        return "".join(out)
    signed_methods = sorted({m for g in galleries for m, s in g.signed.items() if s})
    how = ("Each map is scaled on its own, from its minimum (zero for signed maps) to its 99th "
           "percentile, so a few extreme pixels do not set the range. "
           + (f"Maps with negative values ({escape(', '.join(signed_methods))}) are drawn "
              + ("on a diverging scale centred at zero, blue negative and red positive, more "
                 "opaque where the evidence is stronger. " if signed == "diverging" else
                 "as their absolute value. ") if signed_methods else ""))
    out.append(
        f"<p class=note>Samples ranked by the score <b>{escape(rank_label or 'none (no metric values)')}</b>, "
        "best first. An item's score is the mean over the model's methods; metrics where lower "
        "is better enter it with a minus sign, so a higher score is always better. Samples no "
        f"method could explain come last, with the reason. {how}</p>"
        + _legend(galleries, legends, cmap, signed))
    if capped:
        out.append(f"<p class='note warn'>{escape(capped)}</p>")
    out.append(_pager(n_pages, current))
    if photo_problems:
        shown = photo_problems[:5]
        more = f" (and {len(photo_problems) - 5} more)" if len(photo_problems) > 5 else ""
        out.append("<p class='note warn'>Some photos could not be read, so their maps are shown "
                   f"without them: {escape('; '.join(shown))}{more}</p>")
    ids: set[str] = set()
    for g in galleries:
        out.append(f"<h3>{escape(g.model)}</h3>")
        if g.note:
            out.append(f"<p class=note>{escape(g.note)}</p>")
        head = "<th>photo</th>" + "".join(f"<th>{escape(m)}</th>" for m in g.methods)
        for title, items in g.sections:
            out.append(f"<p class=note><b>{escape(title)}</b></p>")
            rows = []
            for it in items:
                photo = (f"<img src='{it.photo_uri}' alt='{escape(it.sample_id)}'>"
                         if it.photo_uri else "<div class=note>(photo unavailable)</div>")
                cells = [f"<td class=photo>{photo}<span class=sid>{escape(it.sample_id)}</span>"
                         f"<br>{escape(it.title.split(' · ', 1)[-1])}</td>"]
                for m in g.methods:
                    c = it.cells.get(m)
                    if c is None or not c.uri:
                        cells.append(f"<td><div class=err>{escape(c.error if c else 'no row')}</div></td>")
                    else:
                        cells.append(f"<td><img src='{c.uri}' alt='{escape(m)} map of "
                                     f"{escape(it.sample_id)}'>{escape(c.caption)}</td>")
                anchor = sample_anchor(g.model, it.sample_id, it.target)
                attr = "" if anchor in ids else f" id='{anchor}'"  # an item shown twice: once
                ids.add(anchor)
                rows.append(f"<tr{attr}>{''.join(cells)}</tr>")
            out.append(f"<table class=gallery><thead><tr>{head}</tr></thead>"
                       f"<tbody>{''.join(rows)}</tbody></table>")
    out.append(_pager(n_pages, current))
    out.append("</section>")
    return "".join(out)


def per_class_section(data: RunData) -> str:
    """Per model: each explained class (the target), its rows and each metric's mean per
    method; the classes with the most rows first."""
    out = ["<section id=per-class><h2>Per class</h2><p class=note>Rows grouped by the class "
           "explained (the target); mean of each metric over the class's ok rows, per method. "
           "Class names come from the model's weights"
           + (f" and, for labels, {escape(data.classes.labels_source)}"
              if data.classes.labels_source else "") + ".</p>"]
    if not any(u.n_rows for u in data.units):
        out.append("<p class=note>No rows.</p></section>")
        return "".join(out)
    metrics = data.metrics or ["target_prob"]
    for model in data.models():
        units = [u for u in data.units if u.model == model]
        methods = [u.method for u in units]
        per = {u.method: _class_stats(u.agg) for u in units}
        ok_rows: dict[str, int] = {}
        for stats in per.values():
            for c, (n_ok, _) in stats.items():
                ok_rows[c] = ok_rows.get(c, 0) + n_ok
        if not ok_rows:
            out.append(f"<h3>{escape(model)}</h3><p class=note>No ok rows.</p>")
            continue
        order = sorted(ok_rows, key=lambda c: (-ok_rows[c], _class_order(c)))
        counts = pd.Series([ok_rows[c] for c in order], index=order)
        classes = order[:MAX_CLASSES]
        head1 = "<th rowspan=2>class</th><th rowspan=2>rows</th>" + "".join(
            f"<th colspan={len(methods)}>{escape(m).replace('_', '_<wbr>')}{_arrow(m)}</th>"
            for m in metrics)
        head2 = "".join(f"<th>{escape(meth)}</th>" for _ in metrics for meth in methods)
        body = []
        for c in classes:
            target = _class_order(c)[1]
            name = data.classes.target(model, target) if target is not None else ""
            label = (f"{int(target)}" if target is not None else escape(c)) + \
                (f" {escape(name)}" if name else "")
            cells = [f"<td>{label}</td><td class=num>{ok_rows[c]}</td>"]
            for m in metrics:
                for meth in methods:
                    n, total = per[meth].get(c, (0, {}))[1].get(m, (0, 0.0))
                    text = "–" if not n else (f"{fmt(total / n * 100.0, 1)}%"
                                              if m == "pointing_hit" else fmt(total / n))
                    cells.append(f"<td class=num>{text}</td>")
            body.append(f"<tr>{''.join(cells)}</tr>")
        more = len(counts) - len(classes)
        out.append(f"<h3>{escape(model)}</h3><div class=scroll><table class=per-class "
                   f"id='per-class-{escape(model)}'><thead><tr>{head1}</tr><tr>{head2}</tr></thead>"
                   f"<tbody>{''.join(body)}</tbody></table></div>"
                   + (f"<p class=note>and {more} more classes with fewer rows.</p>" if more > 0
                      else ""))
    out.append("</section>")
    return "".join(out)


def _class_order(c: str) -> tuple[int, float | None]:
    """Sort key and numeric target of a class key of an aggregate ("3", "None")."""
    try:
        return (0, float(c))
    except ValueError:
        return (1, None)


def _class_stats(agg: dict) -> dict[str, tuple[int, dict[str, tuple[int, float]]]]:
    """class -> (ok rows, {metric: (values, sum)}) of a unit's aggregate."""
    cm = agg.get("class_metrics") or []
    return {c: (int(v[0]), {m: (int(v[1 + 2 * j]), float(v[2 + 2 * j])) for j, m in enumerate(cm)})
            for c, v in (agg.get("classes") or {}).items()}


def curves_section(charts: list[tuple[str, str]], stored: bool) -> str:
    if not stored:
        return ("<section id=curves><h2>Deletion and insertion curves</h2><p class=note>This run did "
                "not store curves (no deletion_curve / insertion_curve values); list the metric as "
                "<code>{deletion_auc: {curves: true}}</code> (or insertion_auc) in the config's "
                "<code>metrics</code> to keep them.</p></section>")
    imgs = "".join(f"<img class=chart src='{uri}' alt='curves of {escape(model)}'>"
                   for model, uri in charts)
    return ("<section id=curves><h2>Deletion and insertion curves</h2><p class=note>Mean target "
            f"score per step with a 95% band, over the rows that stored a curve.</p>{imgs}</section>")


def distributions_section(charts: list[tuple[str, str]], note: str = "") -> str:
    imgs = "".join(f"<h3>{escape(model)}</h3><img class=chart src='{uri}' "
                   f"alt='metric distributions of {escape(model)}'>" for model, uri in charts)
    return ("<section id=distributions><h2>Metric distributions per method</h2>"
            + (f"<p class='note warn'>{escape(note)}</p>" if note else "")
            + (imgs or "<p class=note>No metric values.</p>") + "</section>")


def errors_section(data: RunData) -> str:
    m = data.manifest
    failures = list(m.get("failures") or [])
    total = int(m.get("failures_total", len(failures)) or 0)
    out = ["<section id=errors><h2>Errors</h2>"]
    if failures:
        items = "".join(f"<li>{escape(str(f))}</li>" for f in failures)
        more = f" ({total} in all; the first {len(failures)} are listed)" if total > len(failures) else ""
        out.append(f"<p class='note warn'>Shards or units that could not be completed{more}:</p>"
                   f"<ul id=failures>{items}</ul>")
    else:
        out.append("<p class=note>Every planned shard of every unit was completed.</p>")
    reasons: dict[tuple[str, str], list] = {}  # (reason, status) -> [rows, units, example]
    bad_rows, total_bad, other = [], 0, 0
    for u in data.units:
        other += int(u.agg.get("other_reasons", 0))
        total_bad += int(u.agg.get("other_reasons", 0))
        for key, (n, example) in (u.agg.get("reasons") or {}).items():
            reason, _, status = key.partition("\x1f")
            r = reasons.setdefault((reason, status), [0, 0, example])
            r[0] += int(n)
            r[1] += 1
            total_bad += int(n)
        bad_rows += [(u.id, *b[1:]) for b in u.agg.get("bad") or []]
    if reasons:
        order = sorted(reasons.items(), key=lambda kv: (-kv[1][0], kv[0]))
        body = "".join(
            f"<tr><td class=msg>{escape(reason or '(no message)')}</td><td>{escape(str(status))}"
            f"</td><td class=num>{n}</td><td class=num>{units}</td><td>"
            f"{escape(str(example))}</td></tr>" for (reason, status), (n, units, example) in order)
        out.append("<h3>By reason</h3><table id=reasons-table><thead><tr><th>reason</th>"
                   "<th>status</th><th>rows</th><th>units</th><th>e.g. sample</th></tr></thead>"
                   f"<tbody>{body}</tbody></table>"
                   + (f"<p class=note>and {other} row(s) with other reasons.</p>" if other else ""))
    shown = bad_rows[:MAX_ERROR_ROWS]
    body = "".join(
        f"<tr><td>{escape(str(unit))}</td><td>{escape(str(sid))}</td>"
        f"<td class=num>{fmt(target, 0)}</td><td>{escape(str(status))}</td>"
        f"<td class=msg>{escape('' if error is None else str(error))}</td></tr>"
        for unit, sid, target, status, error in shown)
    out.append(f"<p class=note>{total_bad} row(s) with an error or a warning"
               + (f"; {len(shown)} are listed (per unit, those of the {BAD_SAMPLE} samples with "
                  "the smallest hash)" if total_bad > len(shown) else "")
               + ".</p>")
    out.append("<table id=errors-table><thead><tr><th>unit</th><th>sample</th><th>target</th>"
               f"<th>status</th><th>reason</th></tr></thead><tbody>{body}</tbody></table></section>")
    return "".join(out)


def config_section(data: RunData) -> str:
    import yaml

    m = data.manifest
    versions = m.get("versions") or {}
    vrows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>"
                    for k, v in sorted(versions.items()))
    config = m.get("config")
    text = (yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False,
                           default_flow_style=False) if config else "(no config in the manifest)")
    return (
        "<section id=config><h2>Config and versions</h2>"
        f"<p class=note>config hash {escape(str(m.get('config_hash', '–')))} · format "
        f"{escape(str(m.get('salmap_format', '–')))}</p>"
        f"<table id=versions-table><thead><tr><th>package</th><th>version</th></tr></thead>"
        f"<tbody>{vrows}</tbody></table><pre>{escape(text)}</pre></section>"
    )


def gallery_page_header(data: RunData, k: int, n_pages: int) -> str:
    """The header of gallery page ``k``: the run and a way back to the index."""
    m = data.manifest
    return (f"<header><h1>salmap report · {escape(str(m.get('run_id', data.uri)))} · gallery page "
            f"{k} of {n_pages}</h1><p>{escape(data.uri)}</p><nav><a href='index.html'>index</a>"
            + (f"<a href='{page_name(k - 1)}'>previous</a>" if k > 1 else "")
            + (f"<a href='{page_name(k + 1)}'>next</a>" if k < n_pages else "")
            + "</nav></header>")


def page(title: str, parts: list[str], footer: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"{parts[0]}<main>{''.join(parts[1:])}<p class=note>{escape(footer)}</p></main>"
        f"<script>{CHECK_SCRIPT}</script></body></html>"
    )
