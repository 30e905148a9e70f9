"""The release report: one static HTML page, viewable offline (inline CSS, charts as SVG data
URIs, no script, no external link), with RICORD's descriptive table by site, plots of studies
per week, age, exclusions and duplicates, and links to each batch's QC contact sheet.

Privacy: the page shows catalog values only (site and batch ids, counts, ages, categories), all
HTML-escaped. Every number comes from ``QUERIES``, the one place the report's SQL lives: run
over the base catalog views, so it can later read ``site_summary`` instead.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from dataclasses import dataclass

import duckdb

from tasks.catalog_query import catalog_view_statements
from tasks.zones import Release

REPORT_PATH = "reports/index.html"

_LATEST_RUNS = ("(SELECT * FROM runs QUALIFY row_number() OVER (PARTITION BY site_id, batch_id "
                "ORDER BY finished DESC, run_id DESC) = 1)")
_PUBLISHED_STUDIES = ("(SELECT DISTINCT site_id, study_uid, study_date FROM studies "
                      "WHERE status = 'published')")
_PATIENTS = "(SELECT DISTINCT ON (patient_id) * FROM patients ORDER BY patient_id, batch_id)"

ALL_SITES = "all sites"
_SITE = f"coalesce(site_id, '{ALL_SITES}')"
_BY_SITE = "GROUP BY GROUPING SETS ((site_id), ())"
_BY_SITE_AND = "GROUP BY GROUPING SETS ((site_id, {0}), ({0}))"

# (site_id, section, label, value): the rows of the descriptive table, long form, with a
# column for all sites together
QUERIES: dict[str, str] = {
    "by_site": f"""
        SELECT {_SITE} AS site, 'Patients' AS section, 'patients' AS label, count(*) AS value,
               0 AS section_order, 0 AS label_order
        FROM {_PATIENTS} {_BY_SITE}
        UNION ALL
        SELECT {_SITE}, 'Studies (published)', 'studies', count(*), 1, 0
        FROM {_PUBLISHED_STUDIES} {_BY_SITE}
        UNION ALL
        SELECT {_SITE}, 'Studies by modality', modality, count(*), 2, 0
        FROM (SELECT DISTINCT site_id, study_uid, modality FROM series
              WHERE status = 'published') {_BY_SITE_AND.format("modality")}
        UNION ALL
        SELECT {_SITE}, 'Age at index (years)', 'median', median(age_at_index), 3, 0
        FROM {_PATIENTS} WHERE age_at_index IS NOT NULL {_BY_SITE}
        UNION ALL
        SELECT {_SITE}, 'Age at index (years)', 'minimum', min(age_at_index), 3, 1
        FROM {_PATIENTS} WHERE age_at_index IS NOT NULL {_BY_SITE}
        UNION ALL
        SELECT {_SITE}, 'Age at index (years)', 'maximum', max(age_at_index), 3, 2
        FROM {_PATIENTS} WHERE age_at_index IS NOT NULL {_BY_SITE}
        UNION ALL
        SELECT {_SITE}, 'Sex', coalesce(sex, 'not recorded'), count(*), 4, 0
        FROM {_PATIENTS} {_BY_SITE_AND.format("sex")}
        UNION ALL
        SELECT {_SITE}, 'COVID status', coalesce(covid_status, 'not recorded'), count(*), 5, 0
        FROM {_PATIENTS} {_BY_SITE_AND.format("covid_status")}
        UNION ALL
        SELECT {_SITE}, 'Test method', coalesce(test_method, 'not recorded'), count(*), 6, 0
        FROM {_PATIENTS} {_BY_SITE_AND.format("test_method")}
        ORDER BY section_order, label_order, label, site""",
    # (site_id, category, value) for each plot
    "studies_per_week": f"""
        SELECT site_id, strftime(date_trunc('week', study_date), '%Y-%m-%d') AS category,
               count(*) AS value
        FROM {_PUBLISHED_STUDIES} WHERE study_date IS NOT NULL GROUP BY ALL ORDER BY 2, 1""",
    "age_distribution": f"""
        SELECT site_id, lpad(CAST(age_at_index // 10 * 10 AS VARCHAR), 2, '0') || '-'
               || lpad(CAST(age_at_index // 10 * 10 + 9 AS VARCHAR), 2, '0') AS category,
               count(*) AS value
        FROM {_PATIENTS} WHERE age_at_index IS NOT NULL GROUP BY ALL ORDER BY 2, 1""",
    "exclusions_by_reason": f"""
        SELECT r.site_id, j.key AS category, sum(CAST(j.value AS BIGINT)) AS value
        FROM {_LATEST_RUNS} r, json_each(r.counts, '$.excluded_by_reason') j
        GROUP BY ALL ORDER BY 2, 1""",
    "duplicates_by_kind": """
        SELECT site_id, kind AS category, count(*) AS value
        FROM duplicates GROUP BY ALL ORDER BY 2, 1""",
}

PLOTS: dict[str, tuple[str, str]] = {  # query -> (title, what a bar counts)
    "studies_per_week": ("Published studies per week, by site (shifted study dates)", "studies"),
    "age_distribution": ("Age at index, by site", "patients"),
    "exclusions_by_reason": ("Excluded files by reason, by site (latest run of each batch)",
                             "files"),
    "duplicates_by_kind": ("Duplicates by kind, by site", "files"),
}

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")


@dataclass(frozen=True)
class ReportData:
    sites: list[str]
    by_site: list[tuple]  # (site_id, section, label, value)
    plots: dict[str, list[tuple]]  # query name -> (site_id, category, value)
    contact_sheets: list[tuple[str, str, str]]  # (site_id, batch_id, link)


def report_data(con: duckdb.DuckDBPyConnection,
                contact_sheets: list[tuple[str, str, str]]) -> ReportData:
    """Run the report's queries over a connection holding the catalog views."""
    by_site = [r[:4] for r in con.execute(QUERIES["by_site"]).fetchall()]
    plots = {name: con.execute(QUERIES[name]).fetchall() for name in PLOTS}
    sites = sorted(({r[0] for r in by_site} | {s for s, _, _ in contact_sheets}) - {ALL_SITES})
    return ReportData(sites=sites, by_site=by_site, plots=plots, contact_sheets=contact_sheets)


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def bar_chart_svg(title: str, categories: list[str], series: dict[str, list[float]],
                  unit: str) -> str:
    """A stacked bar chart as a standalone SVG document (one bar per category)."""
    width, height, left, bottom, top = 760, 360, 130, 130, 36
    plot_w, plot_h = width - left - 110, height - top - bottom
    totals = [sum(v[i] for v in series.values()) for i in range(len(categories))]
    peak = max(totals, default=0) or 1
    step = plot_w / max(len(categories), 1)
    bar = max(min(step * 0.7, 48), 1)
    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="{left}" y="20" font-size="14" font-weight="bold">{esc(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
             'stroke="#333"/>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{_number(peak)}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
             f'<text x="{left - 30}" y="{top + plot_h / 2}" '
             f'transform="rotate(-90 {left - 30} {top + plot_h / 2})" '
             f'text-anchor="middle">{esc(unit)}</text>']
    label_every = max(1, len(categories) // 24)
    for i, category in enumerate(categories):
        x = left + i * step + (step - bar) / 2
        y = top + plot_h
        for k, values in enumerate(series.values()):
            h = values[i] / peak * plot_h
            if h:
                y -= h
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                             f'height="{h:.1f}" fill="{PALETTE[k % len(PALETTE)]}"/>')
        if i % label_every == 0:
            cx, cy = x + bar / 2, top + plot_h + 10
            parts.append(f'<text x="{cx:.1f}" y="{cy}" text-anchor="end" '
                         f'transform="rotate(-45 {cx:.1f} {cy})">{esc(category)}</text>')
    for k, name in enumerate(series):
        y = top + 14 * k
        parts.append(f'<rect x="{left + plot_w + 16}" y="{y}" width="10" height="10" '
                     f'fill="{PALETTE[k % len(PALETTE)]}"/>'
                     f'<text x="{left + plot_w + 30}" y="{y + 9}">{esc(name)}</text>')
    if not categories:
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" '
                     'text-anchor="middle">none</text>')
    parts.append("</svg>")
    return "".join(parts)


def _pivot(rows: list[tuple], sites: list[str]) -> tuple[list[str], dict[str, list[float]]]:
    categories = sorted({r[1] for r in rows})
    cells = {(r[0], r[1]): r[2] for r in rows}
    return categories, {s: [cells.get((s, c), 0) for c in categories] for s in sites}


CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 70em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th.section { background: #eee; }
figure { margin: 1.5em 0; }
figcaption { font-size: 0.9em; color: #555; }
"""


def render_report(data: ReportData) -> str:
    """The whole page: descriptive table, plots (each with its numbers), contact sheets."""
    esc = html.escape
    sites = data.sites
    columns = [*sites, ALL_SITES]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>radrepo release report</title>", f"<style>{CSS}</style></head><body>",
           "<h1>radrepo release report</h1>",
           "<p>Built from the catalog of the COMPLETE batches. Every value is a catalog "
           "value.</p>",
           "<h2>Descriptive table by site</h2>", '<table id="by-site">',
           "<thead><tr><th>characteristic</th>"
           + "".join(f'<th data-site="{esc(s)}">{esc(s)}</th>' for s in columns)
           + "</tr></thead><tbody>"]
    grouped: dict[tuple[str, str], dict[str, object]] = defaultdict(dict)
    order: list[tuple[str, str]] = []
    for site, section, label, value in data.by_site:
        if (section, label) not in grouped:
            order.append((section, label))
        grouped[(section, label)][site] = value
    current = None
    for section, label in order:
        if section != current:
            current = section
            out.append(f'<tr><th class="section" colspan="{len(columns) + 1}">{esc(section)}'
                       "</th></tr>")
        values = grouped[(section, label)]
        out.append(f'<tr data-section="{esc(section)}" data-label="{esc(label)}">'
                   f"<th>{esc(label)}</th>" + "".join(
                       f'<td class="n" data-site="{esc(s)}">'
                       f"{esc(_number(values[s])) if s in values else '0'}</td>"
                       for s in columns) + "</tr>")
    out.append("</tbody></table>")

    out.append("<h2>Plots</h2>")
    for name, (title, unit) in PLOTS.items():
        categories, series = _pivot(data.plots[name], sites)
        svg = bar_chart_svg(title, categories, series, unit)
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
        out.append(f'<figure id="{name}"><img src="{uri}" width="760" height="360" '
                   f'alt="{esc(title)}"><figcaption>{esc(title)}</figcaption>')
        out.append(f'<details><summary>numbers</summary>'
                   f'<table class="plot-data" data-plot="{name}"><thead><tr><th>{esc(unit)}'
                   "</th>" + "".join(f"<th>{esc(s)}</th>" for s in sites) + "</tr></thead>"
                   "<tbody>" + "".join(
                       f'<tr data-category="{esc(c)}"><th>{esc(c)}</th>' + "".join(
                           f'<td class="n" data-site="{esc(s)}">{_number(series[s][i])}</td>'
                           for s in sites) + "</tr>" for i, c in enumerate(categories))
                   + "</tbody></table></details></figure>")

    out.append('<h2>QC contact sheets</h2><ul id="contact-sheets">')
    for site, batch, link in data.contact_sheets:
        out.append(f'<li><a href="{esc(link)}">{esc(site)} / {esc(batch)}</a></li>')
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"


def contact_sheet_links(release: Release, report_path: str) -> list[tuple[str, str, str]]:
    """(site, batch, relative link) of every complete batch whose manifest has a contact sheet."""
    depth = report_path.count("/")
    links = []
    for site, batch in release.complete_batches():
        sheet = f"reports/{site}/{batch}/contact-sheet.html"
        if sheet in set(release.manifest(site, batch).column("path").to_pylist()):
            links.append((site, batch, "../" * depth + sheet))
    return links


def build_report(release: Release) -> str:
    """The report's HTML for the release's complete batches, read from their catalog files."""
    with duckdb.connect(":memory:") as con:
        if not release.local:
            from tasks.duckdb_remote import enable_remote_reads

            enable_remote_reads(con, release.storage_options)
        for statement in catalog_view_statements(release):
            con.execute(statement)
        data = report_data(con, contact_sheet_links(release, REPORT_PATH))
    return render_report(data)


def write_report(release: Release) -> str:
    """Write ``reports/index.html`` into the release (derived state: rewritten when it changes)."""
    release.write_bytes(REPORT_PATH, build_report(release).encode())
    return REPORT_PATH
