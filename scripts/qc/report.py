"""The HTML report of a batch QC run: one self-contained file that opens with tens of thousands of scans.

Layout: counts per status and decision, a histogram of motion probabilities with the threshold, then
one card per scored scan sorted by probability (most likely motion first) with the three central
slices (axial, coronal, sagittal) under the saliency map (where the network sees motion), its
probability and decision; then the table of scans that could not be scored, with
their reasons. Cards are rendered page by page by a few lines of JavaScript from a JSON block:
only the current page's pictures become ``<img>`` elements, so the page opens quickly however many
scans there are. Pictures are JPEG thumbnails embedded as base64 (about 5-10 KB per scan, so
10,000 scans make a report of about 100 MB).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.common.statuses import SCORED_STATUSES

__all__ = ["central_slices", "render_thumbnail", "probability_histogram_svg", "thumbnail_name", "write_report"]


def thumbnail_name(path: str) -> str:
    """File name of a scan's thumbnail (JPEG) inside ``<output_dir>/qc_thumbnails`` (a hash of the path's
    bytes, so any file name, UTF-8 or not, gives a safe one)."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".jpg"


def central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal central slices of an (X, Y, Z) RAS volume, oriented for display
    (rows top to bottom = anterior to posterior for axial, superior to inferior otherwise;
    radiological left-right is not applied: the subject's right is on the viewer's left)."""
    x, y, z = (s // 2 for s in volume.shape)
    axial = volume[:, :, z].T[::-1]  # rows: y (anterior up), columns: x
    coronal = volume[:, y, :].T[::-1]  # rows: z (superior up), columns: x
    sagittal = volume[x, :, :].T[::-1]  # rows: z, columns: y (anterior right)
    return [np.ascontiguousarray(s) for s in (axial, coronal, sagittal)]


def _resize(image: np.ndarray, height: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    mode_img = Image.fromarray(image)
    return np.asarray(mode_img.resize((width, height), Image.BILINEAR))


def render_thumbnail(
    volume: np.ndarray, saliency: np.ndarray | None = None, height: int = 96, quality: int = 75
) -> bytes:
    """A JPEG with the three central slices of ``volume`` (X, Y, Z) side by side, with ``saliency``
    (X, Y, Z, values in [0, 1]) drawn over them: a warm tint where it exceeds 0.3 and a red outline
    around where it exceeds 0.6, so the anatomy stays readable under it.

    Args:
        volume: the (normalised) image; displayed between its 1st and 99.5th percentiles.
        saliency: saliency map on the same grid, or None (plain slices).
        height: pixel height of each slice. quality: JPEG quality.
    """
    from matplotlib import colormaps
    from PIL import Image
    from scipy import ndimage

    volume = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(volume[::2, ::2, ::2], [1.0, 99.5])  # every 8th voxel is plenty for a window
    panels = [
        np.repeat(
            _resize((np.clip((s - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8), height)[..., None],
            3,
            axis=2,
        ).astype(np.float32)
        for s in central_slices(volume)
    ]
    if saliency is not None:
        cmap = colormaps["inferno"]
        for panel, s in zip(panels, central_slices(np.asarray(saliency, dtype=np.float32))):
            s = _resize((np.clip(s, 0, 1) * 255).astype(np.uint8), height).astype(np.float32) / 255.0
            alpha = (0.45 * np.clip((s - 0.3) / 0.7, 0, 1))[..., None]
            panel[:] = panel * (1 - alpha) + cmap(s)[..., :3] * 255.0 * alpha
            hot = s > 0.6
            panel[hot & ~ndimage.binary_erosion(hot)] = (230.0, 40.0, 30.0)
    picture = np.concatenate(panels, axis=1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def probability_histogram_svg(
    probs: Sequence[float], threshold: float, bins: int = 20, width: int = 520, height: int = 160
) -> str:
    """An inline SVG histogram of motion probabilities in [0, 1] with the threshold as a red line."""
    counts, _ = np.histogram(np.asarray(probs, dtype=float), bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()) if len(counts) else 0, 1)
    pad, bar_w = 30, (width - 40) / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img" '
        f'aria-label="histogram of motion probabilities">'
    ]
    for i, c in enumerate(counts):
        h = (height - 10) * c / top
        x = pad + i * bar_w
        parts.append(
            f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" fill="#4a78b5">'
            f"<title>{i / bins:.2f}-{(i + 1) / bins:.2f}: {int(c)} scans</title></rect>"
        )
    tx = pad + threshold * (width - 40)
    parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="0" y2="{height}" stroke="#c0392b" stroke-width="2"/>')
    parts.append(f'<text x="{tx + 3:.1f}" y="12" font-size="11" fill="#c0392b">threshold {threshold:g}</text>')
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<text x="{pad + v * (width - 40):.1f}" y="{height + 16}" font-size="11" text-anchor="middle">{v:g}</text>'
        )
    parts.append(f'<text x="2" y="12" font-size="11">{top}</text><text x="2" y="{height}" font-size="11">0</text>')
    parts.append(
        f'<text x="{width / 2:.0f}" y="{height + 29}" font-size="11" text-anchor="middle">motion probability</text></svg>'
    )
    return "".join(parts)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}
table.counts td,table.counts th{padding:2px 10px;text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:6px;width:400px;font-size:12px}
.card.motion{border-left:6px solid #c0392b}.card.no_motion{border-left:6px solid #27ae60}
.card img{width:100%;display:block;background:#000}
.card .path{word-break:break-all;color:#555}
.prob{font-weight:bold;font-size:14px}.warn{color:#b9770e}
.pager button{margin:0 3px}.pager{margin:8px 0}
table.failed{border-collapse:collapse;font-size:12px}table.failed td,table.failed th{border:1px solid #ddd;padding:3px 6px}
"""

_SCRIPT = """
const DATA = JSON.parse(document.getElementById('qc-data').textContent);
document.getElementById('qc-data').remove();  // the parsed copy is enough
let page = 0, shown = DATA;
const size = Number(document.body.dataset.pageSize);
function esc(s){return String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function card(d){
  const img = d.img ? `<img loading="lazy" alt="central slices and saliency of ${esc(d.path)}" \
src="data:image/jpeg;base64,${d.img}">` : '<div>(no picture)</div>';
  const warn = d.status === 'warning' ? `<div class="warn">warning: ${esc(d.reason)}</div>` : '';
  return `<div class="card ${d.decision}" data-status="${d.status}">${img}
    <div><span class="prob">p(motion) = ${d.prob.toFixed(3)}</span> &middot; <b>${d.decision.replace('_',' ')}</b></div>
    <div>${esc(d.participant_id)} ${esc(d.session_id)}</div><div class="path">${esc(d.path)}</div>${warn}</div>`;
}
function render(){
  const pages = Math.max(1, Math.ceil(shown.length / size));
  page = Math.min(Math.max(page, 0), pages - 1);
  document.getElementById('cards').innerHTML = shown.slice(page * size, (page + 1) * size).map(card).join('');
  for (const el of document.querySelectorAll('.pageinfo')) el.textContent = `page ${page + 1} of ${pages} (${shown.length} scans)`;
}
function filter(){
  const q = document.getElementById('search').value.toLowerCase();
  const dec = document.getElementById('decision').value;
  shown = DATA.filter(d => (!dec || d.decision === dec) && \
(!q || (d.path + ' ' + d.participant_id + ' ' + d.session_id).toLowerCase().includes(q)));
  page = 0; render();
}
for (const b of document.querySelectorAll('button[data-step]')) b.onclick = () => { page += Number(b.dataset.step); render(); };
document.getElementById('search').oninput = filter;
document.getElementById('decision').onchange = filter;
render();
"""


def _counts_table(counts: Mapping[str, int]) -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in counts.items())
    return f'<table class="counts"><tr><th>status</th><th>scans</th></tr>{body}</table>'


def write_report(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    thumbnails_dir: str | os.PathLike | None = None,
    threshold: float = 0.5,
    page_size: int = 50,
    title: str = "Motion quality control",
) -> Path:
    """Write the self-contained HTML report of QC rows (``qc.tsv`` rows) atomically.

    Args:
        rows: rows with ``path, participant_id, session_id, status, reason, prob_motion, decision``.
        path: the HTML file.
        thumbnails_dir: folder of the JPEG thumbnails (named by :func:`scripts.qc.thumbnail_name`).
        threshold: the decision threshold (drawn on the histogram).
        page_size: cards per page.
    """
    from scripts.common.files import atomic_write

    scored, failed = [], []
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        if r["status"] in SCORED_STATUSES and r.get("prob_motion") not in (None, ""):
            scored.append(r)
        else:
            failed.append(r)
    scored.sort(key=lambda r: -float(r["prob_motion"]))
    data = []
    for r in scored:
        img = ""
        if thumbnails_dir is not None:
            thumb = Path(thumbnails_dir) / thumbnail_name(r["path"])
            if thumb.is_file():
                img = base64.b64encode(thumb.read_bytes()).decode("ascii")
        data.append(
            {
                "path": r["path"],
                "participant_id": r.get("participant_id", ""),
                "session_id": r.get("session_id", ""),
                "status": r["status"],
                "reason": r.get("reason", ""),
                "prob": float(r["prob_motion"]),
                "decision": r.get("decision", ""),
                "img": img,
            }
        )
    decisions = {d: sum(1 for r in scored if r.get("decision") == d) for d in ("motion", "no_motion")}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    failed_rows = "".join(
        f"<tr><td>{html.escape(r['status'])}</td><td>{html.escape(r.get('reason', ''))}</td>"
        f"<td>{html.escape(r['path'])}</td></tr>"
        for r in failed
    )
    failed_html = (
        f'<h2>Not scored ({len(failed)})</h2><table class="failed"><tr><th>status</th><th>reason</th><th>path</th></tr>'
        f"{failed_rows}</table>"
        if failed
        else "<h2>Not scored (0)</h2><p>Every input was scored.</p>"
    )
    pager = (
        '<div class="pager"><button data-step="-1">&larr; previous</button><span class="pageinfo"></span>'
        '<button data-step="1">next &rarr;</button></div>'
    )
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body data-page-size="{int(page_size)}">
<h1>{html.escape(title)}</h1>
<p>{len(rows)} inputs: {len(scored)} scored ({decisions['motion']} motion, \
{decisions['no_motion']} no motion at threshold {threshold:g}), {len(failed)} not scored.</p>
{_counts_table(counts)}
<h2>Motion probabilities</h2>{probability_histogram_svg([float(r['prob_motion']) for r in scored], threshold)}
<h2>Scans, most likely motion first</h2>
<p>Axial, coronal and sagittal central slices in t1-linear space (the subject's right on the left of
each picture), with the saliency map of the motion class (where the network sees motion): warm tint,
red outline around the strongest part.</p>
<div><input id="search" placeholder="filter by path or ID" size="40">
<select id="decision"><option value="">all decisions</option><option value="motion">motion</option>\
<option value="no_motion">no motion</option></select></div>
{pager}<div id="cards" class="cards"></div>{pager}
{failed_html}
<script type="application/json" id="qc-data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    # a non-UTF-8 file name (surrogate escapes) shows as \udcff escapes instead of failing the report
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace"))
