"""The report's "Strategy clusters" section, from ``salmap analyze`` (``<run>/analysis/``).

Flagged clusters first, with their evidence; then per unit and class the 2-D embedding as an
inline SVG scatter plot coloured by cluster (each point names its sample on hover and links
to that sample's gallery item, on the index or on the gallery page that holds it; to its
cluster's card when the gallery leaves the sample out) and one card per cluster: mean map, size, share of the class, where
the relevance lies, exemplars (their maps). Empty when the run has not been analysed.
"""

from __future__ import annotations

import io
from html import escape
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from .render import colormap_lut, data_uri

MAX_CLASSES = 40  # classes shown per unit (flagged first, then the largest)
MAX_POINTS = 1500  # points per scatter plot (the hash-sampled rows first)
EXEMPLARS_SHOWN = 4
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def _heat(values: np.ndarray, side: int = 96, cmap: str = "jet") -> str:
    v = np.asarray(values, dtype=np.float64)
    v = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.zeros_like(v)
    rgb = colormap_lut(cmap)[np.round(v * 255).astype(np.uint8)]
    return data_uri(Image.fromarray(rgb).resize((side, side), Image.NEAREST), "PNG")


def _map_png(png: bytes | None, side: int = 64) -> str | None:
    if not png:
        return None
    try:
        gray = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    except Exception:  # noqa: BLE001 - a broken PNG shows as missing
        return None
    return _heat(gray, side)


def _anchor(unit: str, target: int, cluster: int) -> str:
    return f"cluster-{unit}-{target}-{cluster}".replace("_", "-")


def _scatter(rows, unit: str, target: int, links: dict | None = None) -> str:
    if len(rows) > MAX_POINTS:
        rows = rows.sort_values(["embedded", "sample_id"], ascending=[False, True]).head(MAX_POINTS)
    w = h = 260
    pts = []
    for r in rows.itertuples():
        x = 10 + (float(r.x) + 1) / 2 * (w - 20)
        y = 10 + (1 - (float(r.y) + 1) / 2) * (h - 20)
        color = PALETTE[int(r.cluster) % len(PALETTE)]
        href = (links or {}).get((str(r.sample_id), target))
        note = "" if href else " (not in the gallery: links to its cluster)"
        href = escape(href or f"#{_anchor(unit, target, int(r.cluster))}")
        pts.append(f"<a href='{href}'><circle cx='{x:.1f}' "
                   f"cy='{y:.1f}' r='3' fill='{color}' fill-opacity='0.75'><title>"
                   f"{escape(str(r.sample_id))} · cluster {int(r.cluster)}{note}</title></circle></a>")
    return (f"<svg class=scatter width={w} height={h} viewBox='0 0 {w} {h}' "
            f"xmlns='http://www.w3.org/2000/svg' role=img aria-label='2-D embedding of class "
            f"{target}'><rect width='{w}' height='{h}' fill='#fafafa' stroke='#ddd'/>"
            + "".join(pts) + "</svg>")


def _pct(v: Any) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * float(v):.0f}%"


def _card(c: dict, unit: str, thumbs: dict, side: int) -> str:
    flags = "".join(f"<span class=flag>{escape(f)}</span> " for f in c["flags"])
    ex = []
    for s in c["exemplars"][:EXEMPLARS_SHOWN]:
        uri = thumbs.get((s, c["target"]))
        img = f"<img src='{uri}' alt='map of {escape(s)}'>" if uri else ""
        ex.append(f"<figure>{img}<figcaption>{escape(s)}</figcaption></figure>")
    mean_map = np.asarray(c["mean_map"], dtype=np.float64).reshape(side, side)
    return (f"<div class='card{' flagged' if c['flagged'] else ''}' id='"
            f"{_anchor(unit, c['target'], c['cluster'])}'><div class=cardhead>"
            f"<b style='color:{PALETTE[c['cluster'] % len(PALETTE)]}'>cluster {c['cluster']}</b>"
            f" · {c['size']} images ({_pct(c['share'])}) {flags}</div>"
            f"<img class=meanmap src='{_heat(mean_map)}' alt='mean map'>"
            f"<div class=note>in box {_pct(c['box_share'])} · pseudo box "
            f"{_pct(c['pseudo_box_share'])} · border {_pct(c['border_share'])} · half the "
            f"mean map in {_pct(c['region_area'])} of the image</div>"
            + (f"<div class=evidence>{escape(c['evidence'])}</div>" if c["evidence"] else "")
            + f"<div class=exemplars>{''.join(ex)}</div></div>")


def _thumbs(run: str, unit: str, storage: Any, clusters) -> dict:
    from ..read import read_run

    ids = sorted({s for ex in clusters.column("exemplars").to_pylist() for s in ex[:EXEMPLARS_SHOWN]})
    if not ids:
        return {}
    try:
        ds = read_run(run, unit=unit, storage=storage)
        if "saliency_png" not in ds.schema.names:
            return {}
        t = ds.to_table(columns=["sample_id", "target", "saliency_png"],
                        filter=pc.field("sample_id").isin(ids))
    except Exception:  # noqa: BLE001 - thumbnails are a convenience
        return {}
    return {(r["sample_id"], r["target"]): _map_png(r["saliency_png"]) for r in t.to_pylist()}


STYLE = ("<style>#analysis .cls{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start;"
         "margin-bottom:1.5em}#analysis .card{border:1px solid #ddd;padding:.4em;width:330px}"
         "#analysis .card.flagged{border:2px solid #d62728}#analysis .flag{background:#d62728;"
         "color:#fff;padding:0 .3em;border-radius:3px;font-size:.85em}#analysis .evidence"
         "{font-size:.85em;color:#a00}#analysis figure{display:inline-block;margin:.2em;"
         "font-size:.7em;max-width:70px;overflow-wrap:anywhere}#analysis .meanmap{float:right;"
         "margin-left:.4em}</style>")


def analysis_section(run: str, storage: Any = None, links: dict | None = None) -> str:
    """The section's HTML, or "" when ``<run>/analysis/manifest.json`` does not exist.
    ``links``: unit -> {(sample_id, target): href of its gallery item} (from
    :func:`salmap.pipeline.report.gallery.gallery_links`); a point without one links to its
    cluster's card."""
    from ..analyze import load_analysis

    found = load_analysis(run, storage)
    if found is None:
        return ""
    manifest, rows, clusters = found
    side = int(manifest["params"]["side"])
    flagged = [f for u in manifest["units"].values() for f in u["flagged"]]
    out = [STYLE, "<section id=analysis><h2>Strategy clusters</h2><p class=note>"
           f"{escape(manifest['method'])}. {escape(manifest['sampling'])}. Each point of a "
           "scatter plot is one row (its sample id on hover) and links to that sample in the "
           "gallery (to its cluster's card when the gallery pages leave it out).</p>"]
    if flagged:
        out.append(f"<h3>Flagged clusters ({len(flagged)})</h3><ul>")
        for f in sorted(flagged, key=lambda f: -f["size"]):
            out.append(f"<li><a href='#{_anchor(f['unit'], f['target'], f['cluster'])}'>"
                       f"{escape(f['unit'])} · {escape(str(f['class']))} · cluster "
                       f"{f['cluster']}</a>: {f['size']} images ({_pct(f['share'])}), "
                       f"{escape(', '.join(f['flags']))}: {escape(f['evidence'])}</li>")
        out.append("</ul>")
    else:
        out.append("<p>No cluster flagged.</p>")
    for unit, cl in clusters.items():
        out.append(f"<h3>{escape(unit)}</h3>")
        r = rows[unit].to_pandas()
        cards = cl.to_pylist()
        by_class: dict[int, list[dict]] = {}
        for c in cards:
            by_class.setdefault(c["target"], []).append(c)
        order = sorted(by_class, key=lambda t: (not any(c["flagged"] for c in by_class[t]),
                                                -by_class[t][0]["class_size"], t))
        shown = order[:MAX_CLASSES]
        thumbs = _thumbs(run, unit, storage, cl.filter(pc.field("target").isin(shown)))
        for t in shown:
            cs = sorted(by_class[t], key=lambda c: (not c["flagged"], c["cluster"]))
            out.append(f"<h4>class {t} · {cs[0]['class_size']} rows · {len(cs)} clusters</h4>"
                       f"<div class=cls>{_scatter(r[r['target'] == t], unit, t, (links or {}).get(unit))}"
                       + "".join(_card(c, unit, thumbs, side) for c in cs) + "</div>")
        if len(order) > MAX_CLASSES:
            out.append(f"<p class=note>{len(order) - MAX_CLASSES} more classes in "
                       f"analysis/{escape(unit)}/clusters.parquet.</p>")
    out.append("</section>")
    return "".join(out)
