"""The HTML report of a run (``salmap report RUN``): one self-contained folder, ``report/``.

``index.html`` shows the run's config and versions, per-unit metric summaries (mean and 95%
interval), a per-class breakdown, the gallery (every sample when there are few, else the
best and worst), mean deletion/insertion curves (when the run stored them), metric
distributions per method, and the failures and error rows with their reasons. When there are
more samples than fit one page, ``gallery-0001.html``, ``gallery-0002.html``, ... show every
sample, ranked, a page at a time. Pictures are embedded as data URIs, so the folder can be
copied, mailed or served from a bucket as it is. Class names come from the model's weights
and from ``classes.json`` next to the shards (:mod:`salmap.pipeline.report.classes`).

Where it goes: ``<run>/report/``. For an ``s3://`` run it is written there in the bucket
*and* copied to a local folder, whose ``index.html`` path is returned so it can be opened in
a browser: ``$SALMAP_REPORT_DIR/<bucket>/<key>/report/``, with ``SALMAP_REPORT_DIR``
defaulting to ``$XDG_CACHE_HOME/salmap/reports`` (``~/.cache/salmap/reports``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..storage import Store
from .charts import curves, distributions
from .data import RunData, load_run, sample_note
from .gallery import (
    PAGE_SIZE,
    gallery_links,
    index_plan,
    page_plans,
    rank_items,
    render_galleries,
    scored_rows,
)
from .page import (
    actors_section,
    config_section,
    curves_section,
    distributions_section,
    errors_section,
    gallery_page_header,
    gallery_section,
    header,
    label_quality_section,
    page,
    page_name,
    per_class_section,
    summary_section,
)
from .render import DIVERGING, SEQUENTIAL, SIGNED_MODES, THUMB_SIDE, colorbar, data_uri, png_uri

REPORT_KEY = "report/index.html"
DEFAULT_MAX_SAMPLES = 5000  # gallery pages hold at most this many samples per model by default

__all__ = ["REPORT_KEY", "local_copy_path", "render_pages", "render_report", "write_report"]


def local_copy_path(run: str) -> str:
    """Where the local copy of an ``s3://`` run's report is written (see the module doc)."""
    base = os.environ.get("SALMAP_REPORT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "salmap", "reports")
    return os.path.join(base, run[len("s3://"):].strip("/"), *REPORT_KEY.split("/"))


def _distribution_values(data: RunData, model: str) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for metric in data.metrics:
        if metric == "pointing_hit":  # a yes/no outcome: its hit rate is in the summary table
            continue
        per = {}
        for u in data.units:
            if u.model == model and metric in u.rows:
                v = np.asarray(u.rows[metric].astype("float64"), dtype=float)
                per[u.method] = v[np.isfinite(v)]
        out[metric] = per
    return out


def _class_names(run: str, storage: Any):
    """model -> class-name function (names of known pretrained models, else class_<id>)."""
    def names(model: str):
        try:
            from ..export import namer

            return namer(Store.open(run, storage), model, None)
        except Exception:  # noqa: BLE001 - names are a convenience
            return lambda c: f"class_{c}"

    return names


def _analysis(run: str, storage: Any, links: dict | None = None) -> str:
    """The "Strategy clusters" section when ``salmap analyze`` has run (else "");
    ``links``: unit -> {(sample_id, target): href of the sample's gallery item}."""
    try:
        from .analysis import analysis_section

        return analysis_section(run, storage, links)
    except Exception as err:  # noqa: BLE001 - a broken analysis never costs the report
        return f"<section id=analysis><p class=note>analysis not shown: {type(err).__name__}: {err}</p></section>"


def render_pages(run: str, storage: Any = None, rank_by: str | None = None, per_side: int = 4,
                 cmap: str = SEQUENTIAL, side: int = THUMB_SIDE, signed: str = "diverging",
                 max_samples: int | None = DEFAULT_MAX_SAMPLES,
                 page_size: int = PAGE_SIZE, commits: dict | None = None,
                 aggregates: dict | None = None) -> dict[str, str]:
    """Every page of the report: ``{"index.html": html, "gallery-0001.html": html, ...}``
    (see :func:`write_report` for the parameters)."""
    if signed not in SIGNED_MODES:
        raise ValueError(f"signed must be one of {', '.join(SIGNED_MODES)}, got {signed!r}")
    t0 = time.perf_counter()
    data = load_run(run, storage, commits, aggregates)
    rank_label, rows = scored_rows(data, rank_by)
    ranked = {m: rank_items(rows[rows["model"] == m]) for m in data.models()} if len(rows) else {}
    everything_fits = all(len(v) <= page_size for v in ranked.values())
    pages = [] if everything_fits else page_plans(ranked, page_size, max_samples)
    capped = ""
    if not everything_fits and max_samples and any(len(v) > max_samples for v in ranked.values()):
        capped = (f"The gallery pages show the best and worst {max_samples} samples per model "
                  f"(of up to {max(len(v) for v in ranked.values())}); run `salmap report "
                  f"{run} --max-samples 0` for every sample.")
    sampled = sample_note(data.units)
    if sampled:
        capped = f"{sampled} {capped}".strip()
    legends = {"sequential": data_uri(colorbar(cmap), "PNG"),
               "diverging": data_uri(colorbar(DIVERGING), "PNG")}
    style = {"side": side, "cmap": cmap, "signed": signed}
    index = {m: index_plan(v, per_side, page_size) for m, v in ranked.items()}
    galleries, photos = render_galleries(data, rows, index, storage, **style)
    where = gallery_links(index, pages, [page_name(k) for k in range(1, len(pages) + 1)])
    per_model: dict[str, dict] = {}
    for (model, sid, tgt), href in where.items():
        per_model.setdefault(model, {})[(sid, tgt)] = href
    links = {u.id: per_model.get(u.model, {}) for u in data.units}
    curve_charts, dist_charts = [], []
    for model in data.models():
        units = [u for u in data.units if u.model == model]
        if data.has_curves:
            stats = {u.method: u.curves for u in units if u.curves}
            if stats:
                curve_charts.append((model, png_uri(curves(stats, model))))
        dist_charts.append((model, png_uri(distributions(_distribution_values(data, model), model))))
    parts = [
        header(data),
        summary_section(data),
        actors_section(data),
        gallery_section(galleries, rank_label, legends, cmap, photos.problems, len(pages),
                        None, signed, capped),
        _analysis(run, storage, links),
        label_quality_section(data, _class_names(run, storage)),
        per_class_section(data),
        curves_section(curve_charts, data.has_curves),
        distributions_section(dist_charts, sampled),
        errors_section(data),
        config_section(data),
    ]
    title = f"salmap report · {data.manifest.get('run_id', run)}"
    out = {}
    for k, plan in enumerate(pages, start=1):
        g, ph = render_galleries(data, rows, plan, storage, **style)
        out[page_name(k)] = page(f"{title} · gallery {k}", [
            gallery_page_header(data, k, len(pages)),
            gallery_section(g, rank_label, legends, cmap, ph.problems, len(pages), k, signed,
                            capped)], "")
    footer = (f"Generated by salmap in {time.perf_counter() - t0:.1f} s on "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")
    return {"index.html": page(title, parts, footer), **out}


def render_report(run: str, storage: Any = None, rank_by: str | None = None, per_side: int = 4,
                  cmap: str = SEQUENTIAL, side: int = THUMB_SIDE, signed: str = "diverging",
                  max_samples: int | None = DEFAULT_MAX_SAMPLES) -> str:
    """The report's ``index.html`` text (see :func:`write_report` for the parameters)."""
    return render_pages(run, storage, rank_by, per_side, cmap, side, signed,
                        max_samples)["index.html"]


def write_report(run: str, storage: Any = None, rank_by: str | None = None, per_side: int = 4,
                 cmap: str = SEQUENTIAL, side: int = THUMB_SIDE, signed: str = "diverging",
                 max_samples: int | None = DEFAULT_MAX_SAMPLES, page_size: int = PAGE_SIZE,
                 commits: dict | None = None, aggregates: dict | None = None) -> str:
    """Write ``<run>/report/`` (``index.html`` and the gallery pages) and return the path of
    a local ``index.html`` to open.

    ``run``: ``<run.output>/<run.id>``, a local folder or ``s3://`` URL; ``storage``: the
    config's storage section or ``{"endpoint": ...}``. ``rank_by`` picks the gallery's order
    (default ``insertion_auc - deletion_auc``, else the first metric with values; a column
    name or ``"a - b"``); ``per_side`` samples are shown from each end on the index when the
    samples do not fit one page; ``cmap`` is any matplotlib colormap; ``side`` is the
    thumbnail's longest side in pixels; ``signed`` draws maps with negative values on a
    diverging scale centred at zero (``"diverging"``) or as their absolute value (``"abs"``);
    ``max_samples`` caps the samples per model on the gallery pages (None or 0: all);
    ``page_size``: samples per model on one gallery page; ``aggregates``: the units'
    aggregates when the caller has them (``salmap run``: the ledger's), or ``commits``: the
    run's commit records already in memory; else the records are read here, a chunk at a time.
    Either way no row is read but the gallery's maps (:mod:`salmap.pipeline.report.data`).

    Returns the absolute path of ``<run>/report/index.html`` for a local run; for an s3 run
    the report is written to ``<run>/report/`` in the bucket and the returned path is the
    local copy's, :func:`local_copy_path`.
    """
    pages = render_pages(run, storage, rank_by=rank_by, per_side=per_side, cmap=cmap, side=side,
                         signed=signed, max_samples=max_samples or None, page_size=page_size,
                         commits=commits, aggregates=aggregates)
    store = Store.open(run, storage)
    folder = REPORT_KEY.rsplit("/", 1)[0]
    old = [k for k in store.list(folder) if k.rsplit("/", 1)[-1].startswith("gallery-")]
    for name, html in pages.items():
        store.write_bytes(f"{folder}/{name}", html.encode("utf-8"))
    for key in old:  # pages of an earlier, longer report
        if key.rsplit("/", 1)[-1] not in pages:
            store.delete(key)
    if not store.is_s3:
        return os.path.abspath(store.path(REPORT_KEY))
    local = local_copy_path(run)
    local_store = Store.open(os.path.dirname(local))
    for name, html in pages.items():
        local_store.write_bytes(name, html.encode("utf-8"))
    return os.path.abspath(local)
