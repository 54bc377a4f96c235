"""Self-contained HTML report of a compare: ``index.html``, ``images/*.png`` and ``summary.json``.

The page has a summary table (counts per class, thresholds, settings that differ) and, for each
changed item worst first, baseline | candidate | difference heatmap (scaled to the item's largest
difference, so that even a 1-level difference is visible) side by side with the metrics, the
prompt and the differing settings. Images are files next to the page (relative
links), so the folder can be copied or served as it is; no external resources are loaded. A
small script marks every ``<img>`` with ``data-loaded="1"`` (or ``data-failed="1"``) and sets
``data-images-loaded`` / ``data-images-total`` on ``<body>``, so a headless browser's
``--dump-dom`` shows whether the images loaded.
"""

from __future__ import annotations

import html
import json
import math
import re

import numpy as np

THUMB = 256  # longest side of the images shown in the report
# The heatmap scales |diff| (max over channels) to the image's largest difference, which is white;
# any difference at all is at least HEAT_FLOOR (purple), so a 1-level change is plainly visible.
HEAT_FLOOR = 64
MARKER = ".batchgen-report.json"  # marks a folder as a compare report (rewritable by the next one)
_OUR_FILES = re.compile(r"^(index\.html|summary\.json|\.batchgen-report\.json"
                        r"|images/\d{5}-(baseline|candidate|diff)\.png)$")
# Colour stops of the heatmap (value 0..1 -> RGB): black, purple, red, orange, white.
_STOPS = [(0.0, (0, 0, 0)), (0.25, (90, 0, 140)), (0.5, (220, 40, 40)), (0.75, (255, 190, 0)),
          (1.0, (255, 255, 255))]


def _colormap() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    pos = [s[0] for s in _STOPS]
    lut = np.stack([np.interp(x, pos, [s[1][ch] for s in _STOPS]) for ch in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


COLORMAP = _colormap()


def heat_levels(d: np.ndarray) -> np.ndarray:
    """Colormap indices of absolute differences ``d`` (0..255): 0 stays black, the largest
    difference in ``d`` is 255 (white) and every other difference lies in HEAT_FLOOR..255, so
    small differences stay visible next to large ones and on their own."""
    d = d.astype(np.int32)
    top = int(d.max()) if d.size else 0
    if top == 0:
        return np.zeros(d.shape, np.uint8)
    scaled = HEAT_FLOOR + -(-(255 - HEAT_FLOOR) * d // top)  # ceil: the top maps to exactly 255
    return np.where(d > 0, scaled, 0).astype(np.uint8)


def diff_heatmap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 heatmap of ``max_channel |a - b|`` through :func:`heat_levels` and :data:`COLORMAP`."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    if d.ndim == 3:
        d = d.max(axis=2)
    return COLORMAP[heat_levels(d)]


def _max_pool_to(img: np.ndarray, size: int) -> np.ndarray:
    """Shrink by an integer factor taking block maxima, so single-pixel differences stay visible."""
    f = math.ceil(max(img.shape[:2]) / size)
    if f <= 1:
        return img
    h, w = img.shape[:2]
    ph, pw = (-h) % f, (-w) % f
    img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
    return img.reshape((h + ph) // f, f, (w + pw) // f, f, 3).max(axis=(1, 3))


def _png(arr: np.ndarray, shrink: bool = True) -> bytes:
    import io

    from PIL import Image

    im = Image.fromarray(arr)
    if shrink and max(im.size) > THUMB:
        im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.pass{color:#070}.fail{color:#b00}.item{border:1px solid #ddd;margin:1em 0;padding:.6em}
.pics{display:flex;gap:.6em;flex-wrap:wrap}.pics figure{margin:0}
.pics img{width:256px;height:auto;image-rendering:pixelated;background:#eee}
figcaption{font-size:.85em;color:#555}.prompt{font-style:italic}code{font-size:.9em}
"""

_JS = """
function bgMark(){var imgs=document.images,ok=0,bad=0;
for(var i=0;i<imgs.length;i++){var im=imgs[i];if(!im.complete)continue;
if(im.naturalWidth>0){im.setAttribute('data-loaded','1');ok++}else{im.setAttribute('data-failed','1');bad++}}
var b=document.body;b.setAttribute('data-images-total',imgs.length);b.setAttribute('data-images-loaded',ok);
b.setAttribute('data-images-failed',bad);b.setAttribute('data-ready',ok+bad===imgs.length?'yes':'no')}
document.addEventListener('DOMContentLoaded',function(){var imgs=document.images;
for(var i=0;i<imgs.length;i++){imgs[i].addEventListener('load',bgMark);imgs[i].addEventListener('error',bgMark)}
bgMark()});window.addEventListener('load',bgMark);
"""


def _settings_html(settings: dict) -> str:
    if not settings:
        return ""
    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(repr(b))}</td>"
        f"<td>{html.escape(repr(c))}</td></tr>" for k, (b, c) in sorted(settings.items()))
    return f"<table class='settings'><tr><th>setting</th><th>baseline</th><th>candidate</th></tr>{rows}</table>"


def _item_images(item, out, storage_config, n: int, written: set[str]) -> str:
    """Write baseline/candidate/heatmap PNGs of one item; return the <figure>s (or a note)."""
    from .outputs import load_image

    try:
        a = load_image(item.baseline_image, storage_config)
        b = load_image(item.candidate_image, storage_config)
    except Exception as exc:  # the item is already marked changed with its note
        return f"<p>images unavailable: {html.escape(str(exc))}</p>"
    pics = [("baseline", a, True), ("candidate", b, True)]
    if a.shape == b.shape:
        top = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
        label = (f"|diff|, scaled: {top} = white, any difference >= purple" if top else
                 "no pixel differs (metadata only)")
        pics.append((label, _max_pool_to(diff_heatmap(a, b), THUMB), False))
    figs = []
    for (label, arr, shrink), kind in zip(pics, ("baseline", "candidate", "diff")):
        name = f"images/{n:05d}-{kind}.png"
        out.join(*name.split("/")).write_bytes(_png(arr, shrink))
        written.add(name)
        figs.append(f"<figure><img src='{name}' alt='{kind} of {html.escape(item.item_id)}' "
                    f"class='{kind}'><figcaption>{html.escape(label)}</figcaption></figure>")
    return "<div class='pics'>" + "".join(figs) + "</div>"


def render_html(result, body_items: str, shown: int) -> str:
    """The page around the already rendered changed-item blocks."""
    c = result.counts
    verdict = "<b class='pass'>PASS</b>" if result.passed else "<b class='fail'>FAIL</b>"
    counts = "".join(f"<tr><td>{k.replace('_', ' ')}</td><td id='count-{k}'>{c[k]}</td></tr>" for k in c)
    th = result.thresholds
    thr = (f"max pixel diff {_fmt(th.max_pixel_diff, 'd')}, min PSNR {_fmt(th.min_psnr, 'g')} dB, "
           f"min SSIM {_fmt(th.min_ssim, 'g')}")
    settings = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{n}</td></tr>"
                       for k, n in sorted(result.settings_differ.items()))
    others = "".join(
        f"<tr id='item-{html.escape(i.item_id)}' class='row-{i.status}'><td>{html.escape(i.item_id)}</td>"
        f"<td>{i.status.replace('_', ' ')}</td><td>{_fmt(i.max_abs_diff, 'd')}</td>"
        f"<td>{_fmt(i.psnr, '.2f')}</td><td>{_fmt(i.ssim, '.5f')}</td><td>{html.escape(i.note)}</td></tr>"
        for i in result.items if i.status != "changed")
    n_changed = c["changed"]
    more = (f"<p>{n_changed - shown} more changed items are listed in summary.json.</p>"
            if n_changed > shown else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>batchgen compare</title>
<style>{_CSS}</style><script>{_JS}</script></head>
<body data-changed="{n_changed}" data-passed="{str(result.passed).lower()}">
<h1>batchgen compare: {verdict}</h1>
<table><tr><th>baseline</th><td><code>{html.escape(result.baseline)}</code></td></tr>
<tr><th>candidate</th><td><code>{html.escape(result.candidate)}</code></td></tr>
<tr><th>thresholds</th><td>{thr}</td></tr></table>
<h2>Summary</h2><table id="counts"><tr><th>class</th><th>items</th></tr>{counts}</table>
{"<h2>Settings that differ</h2><table><tr><th>column</th><th>items</th></tr>" + settings + "</table>" if settings else ""}
<h2>Changed items, worst first</h2>{body_items or "<p>None.</p>"}{more}
{"<h2>Other items</h2><table id='others'><tr><th>item</th><th>class</th><th>max diff</th><th>PSNR</th><th>SSIM</th><th>note</th></tr>" + others + "</table>" if others else ""}
</body></html>
"""


def write_report(result, report_uri: str, storage_config=None, limit: int = 200) -> str:
    """Write the report folder (local or s3://); return the URI of ``index.html``.

    Only the ``limit`` worst changed items get images (their files are re-read now); every item
    is in ``summary.json``. The folder must be new, empty or an earlier report (its marker file
    ``.batchgen-report.json``, written first): a report never writes into a job output or a folder
    of someone's files. Over an earlier report, its images this report does not write are removed.
    """
    from .storage import Location, destination_files, remove_stale

    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out = Location.parse(str(report_uri), storage_config)
    existing = destination_files(out, MARKER, _is_report, refuse="--report writes only into a new or empty "
                                 "folder, or over an earlier report; choose another --report folder")
    out.join(MARKER).write_bytes(json.dumps({"kind": "batchgen-compare-report", "baseline": result.baseline,
                                             "candidate": result.candidate}, indent=2).encode("utf-8"))
    written = {MARKER, "summary.json", "index.html"}
    blocks = []
    changed = [i for i in result.items if i.status == "changed"]
    for n, item in enumerate(changed[:limit]):
        pics = (_item_images(item, out, storage_config, n, written)
                if item.baseline_image and item.candidate_image else "")
        metrics = (f"max pixel diff <b>{_fmt(item.max_abs_diff, 'd')}</b>, PSNR <b>{_fmt(item.psnr, '.2f')}</b> dB, "
                   f"SSIM <b>{_fmt(item.ssim, '.5f')}</b>")
        note = f"<p>{html.escape(item.note)}</p>" if item.note else ""
        blocks.append(
            f"<div class='item changed' id='item-{html.escape(item.item_id)}' data-item='{html.escape(item.item_id)}'>"
            f"<h3>{n + 1}. <code>{html.escape(item.item_id)}</code></h3><p>{metrics}</p>{note}"
            f"<p class='prompt'>{html.escape(item.prompt or '')}</p>{pics}{_settings_html(item.settings)}</div>")
    page = render_html(result, "\n".join(blocks), min(limit, len(changed)))
    out.join("summary.json").write_bytes(
        json.dumps(result.to_json(), indent=2, sort_keys=True, default=str).encode("utf-8"))
    index = out.join("index.html")
    index.write_bytes(page.encode("utf-8"))
    remove_stale(out, existing, written, _OUR_FILES)  # an earlier report's images this one did not write
    return index.uri


def _is_report(marker) -> bool:
    """True when ``marker`` is the marker file of a compare report."""
    from .errors import StorageError

    if not marker.exists():
        return False
    try:
        data = json.loads(marker.read_bytes())
    except (ValueError, StorageError):
        return False
    return isinstance(data, dict) and data.get("kind") == "batchgen-compare-report"
