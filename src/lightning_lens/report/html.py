"""The run report: one self-contained HTML page from what the callbacks logged (``python -m lightning_lens report``).

Self-contained: images are embedded as ``data:`` URIs (PNG), the CSS is inline, nothing is fetched (no scripts, no
fonts, no links to the network), and every text from the logs is HTML-escaped. Sections, each shown when its data
is there: the sanity verdicts explained in words (what passes/fails means, the deciding metric and its numbers, the
controls and their expected verdicts) with the cascade and similarity figures; the saliency maps over epochs; the
error slices with their example grid; the HTML views the callbacks logged (token attributions of text models), each
in a sandboxed ``<iframe srcdoc>`` (no scripts, nothing fetched); curves of the logged scalars (a metric beside its
``_chance`` level) drawn with matplotlib (Agg); the other figures (MoE, concepts, kNN gallery, TracIn) and tables; errors the callbacks reported.
Plain Python: no Lightning.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Optional

from lightning_lens.report.logs import RunLog, find_runs, read_run
from lightning_lens.report.summaries import CONTROL_EXPECTED, format_number, sanity_rule_text, verdict_meaning

__all__ = ["build_report", "render_run", "report_command", "write_report"]

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1320px;color:#222;
line-height:1.45;padding:0 16px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:21px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:17px;margin:22px 0 6px}.muted{color:#666;font-size:13px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}th{background:#f2f2f2}
td.wrap{white-space:normal;min-width:260px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.passes{color:#0a7d27;font-weight:600}.fails{color:#b3261e;font-weight:600}.inconclusive{color:#8a6d00;font-weight:600}
figure{margin:10px 0;display:inline-block;vertical-align:top}figcaption{font-size:13px;color:#444;max-width:640px}
img{max-width:100%;border:1px solid #e3e3e3;image-rendering:pixelated}
img.plot{image-rendering:auto}
.steps{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.steps figure{max-width:640px}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plots figure{margin:0}
.scroll{overflow-x:auto}.note{background:#f7f7f7;border-left:4px solid #999;padding:6px 10px;font-size:14px}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}
nav a{margin-right:12px}
iframe.view{width:100%;border:1px solid #e3e3e3;resize:vertical;background:#fff}
"""

#: images narrower than this many pixels are shown up to ``_MAX_ZOOM`` times larger
_SMALL_IMAGE = 560
_MAX_ZOOM = 1.6
#: scalar tags that are bookkeeping rather than results
_SKIP_SCALARS = re.compile(r"(^|/)(seconds|epoch|skipped_methods|excluded_nonfinite|eval_samples)$|^epoch$")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _png_size(png: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG's header, or None."""
    if len(png) < 24 or not png.startswith(b"\x89PNG"):
        return None
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _img(png: bytes, alt: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css}"' if css else ""
    size = _png_size(png)
    width = ""
    if css != "plot" and size is not None and 0 < size[0] < _SMALL_IMAGE:  # small grids are shown larger
        width = f' width="{round(size[0] * min(_MAX_ZOOM, _SMALL_IMAGE / size[0]))}"'
    return f'<img{cls}{width} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure(png: bytes, caption: str, alt: str, css: str = "") -> str:
    return f"<figure>{_img(png, alt, css)}<figcaption>{_e(caption)}</figcaption></figure>"


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# -------------------------------------------------------------------------------------------------------- markdown
def _unescape_sink(text: str) -> str:
    """The sink escapes ``<``/``>`` for TensorBoard's markdown; undo it before escaping for HTML."""
    return text.replace("&lt;", "<").replace("&gt;", ">")


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def markdown_to_html(text: str) -> str:
    """The markdown the callbacks log (tables, paragraphs, lists) as escaped HTML.

    Example:
        >>> page = markdown_to_html("| a | b |\\n| --- | --- |\\n| <x> | 1 |")
        >>> print(page.replace("<tr>", "\\n<tr>"))
        <div class="scroll"><table>
        <tr><th>a</th><th>b</th></tr>
        <tr><td>&lt;x&gt;</td><td class="num">1</td></tr></table></div>
    """
    lines = _unescape_sink(text).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]):
            head = _split_row(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_split_row(lines[i]))
                i += 1
            cells = "".join(f"<th>{_e(c)}</th>" for c in head)
            body = "".join(
                "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if _is_number(c) else f"<td>{_e(c)}</td>" for c in r)
                + "</tr>" for r in rows)
            out.append(f'<div class="scroll"><table><tr>{cells}</tr>{body}</table></div>')
            continue
        if line.strip().startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].strip().startswith(("- ", "* ")):
                items.append(f"<li>{_e(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        if line.strip():
            out.append(f"<p>{_e(line.strip())}</p>")
        i += 1
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------- plots
def _plot_png(title: str, series: dict[str, list[tuple[int, float]]]) -> bytes:
    """One line chart (steps on x); a ``..._chance`` series is drawn dashed in its metric's colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.9), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours: dict[str, Any] = {}
    names = sorted(series, key=lambda n: (n.endswith("_chance"), n))
    for name in names:
        points = series[name]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        base = name[: -len("_chance")] if name.endswith("_chance") else None
        label = name.rsplit("/", 1)[-1]
        if base is not None and base in colours:
            ax.plot(xs, ys, linestyle="--", color=colours[base], linewidth=1.2, label=f"{label} (chance level)")
        else:
            (line,) = ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, linewidth=1.5,
                              label=label)
            colours[name] = line.get_color()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="best", ncol=1 if len(series) <= 6 else 2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _scalar_families(scalars: dict[str, list[tuple[int, float]]], max_lines: int = 12
                     ) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """Charts: a tag with three or more components is drawn with its siblings (``slices/acc/*``, a metric and its
    ``_chance``); two-component tags each get their own chart; single points and bookkeeping are left out."""
    families: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for tag, points in sorted(scalars.items()):
        if _SKIP_SCALARS.search(tag) or len({s for s, _ in points}) < 2:
            continue
        if tag.endswith("excluded") and not any(v for _, v in points):  # nothing was excluded: no chart
            continue
        parts = tag.split("/")
        key = "/".join(parts[:-1]) if len(parts) >= 3 else tag
        families.setdefault(key, {})[tag] = points
    out = []
    for key, series in families.items():
        if len(series) > max_lines:  # keep the chart readable: the lowest final values (the worst slices) first
            ranked = sorted(series, key=lambda t: series[t][-1][1])[:max_lines]
            series = {t: series[t] for t in ranked}
        out.append((key, series))
    return out


def _spread(items: Sequence[Any], limit: int) -> list[Any]:
    """At most ``limit`` items evenly spread over ``items``, first and last included."""
    if len(items) <= limit:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


# -------------------------------------------------------------------------------------------------------- sections
def _epoch_of(run: RunLog, step: int) -> Optional[int]:
    """The epoch Lightning logged at ``step`` (its ``epoch`` scalar), if any."""
    for s, v in reversed(run.scalars.get("epoch", [])):
        if s <= step:
            return int(v)
    return None


def _when(run: RunLog, step: int) -> str:
    epoch = _epoch_of(run, step)
    return f"step {step}" + (f", epoch {epoch}" if epoch is not None else "")


def _sanity_section(run: RunLog, used: set[str]) -> str:
    report = run.latest_json("sanity/report")
    images = [t for t in ("sanity/cascade", "sanity/similarity") if t in run.images]
    if report is None and not images:
        return ""
    used.update(["sanity/report", "sanity/verdicts", *images])
    parts = ['<h2 id="sanity">Randomization sanity check</h2>',
             '<p class="note">Adebayo et al. (2018): the weights of the trained model are re-drawn layer by '
             "layer, from the top, and each explanation method explains the same inputs again. A method whose maps "
             "depend on what the model learned must change; one whose maps stay alike shows something else (the "
             "input's edges, say) and cannot be trusted to explain this model.</p>"]
    if report is not None:
        rule = report.get("rule", {})
        stages = report.get("stages", [])
        methods = report.get("methods", {})
        used_stages = max([int((m.get("verdict") or {}).get("stages_used") or 0) for m in methods.values()] or [1])
        how = sanity_rule_text(rule.get("metric", "?"), used_stages, len(stages), rule.get("pass_below", math.nan),
                               rule.get("fail_above", math.nan))
        parts.append(f"<p><b>How the verdict is reached.</b> {_e(how)}."
                     f" Stages randomized ({_e(report.get('mode', ''))}, {_e(report.get('order', ''))}): "
                     f"{_e(', '.join(stages))}.</p>")
        rows = []
        for name, m in methods.items():
            v = m.get("verdict") or {}
            outcome = v.get("outcome", "?")
            expected = CONTROL_EXPECTED.get(name)
            if expected:
                agrees = "as expected" if outcome == expected[0] else f"expected {expected[0]}"
                meaning = f"control ({expected[1]}): {agrees}"
                label = f"{name} (control)"
            else:
                meaning = verdict_meaning(outcome)
                label = name
            numbers = "".join(f'<td class="num">{_e(format_number(v.get(k)))}</td>'
                              for k in ("similarity", "floor", "ceiling", "score"))
            rows.append(f"<tr><td>{_e(label)}</td><td class=\"{_e(outcome)}\">{_e(outcome)}</td>{numbers}"
                        f"<td class=\"wrap\">{_e(meaning)}</td><td class=\"muted wrap\">{_e(v.get('reason', ''))}</td>"
                        "</tr>")
        metric = _e(rule.get("metric", "metric"))
        parts.append(f'<div class="scroll"><table><tr><th>method</th><th>verdict</th><th>{metric}</th><th>floor</th>'
                     "<th>ceiling</th><th>normalized</th><th>what it means</th><th>reason</th></tr>"
                     + "".join(rows) + "</table></div>")
        parts.append('<p class="muted">similarity: the deciding metric (median over the probes, averaged over the '
                     "first stages); floor: the same metric between maps of two different inputs; ceiling: between "
                     "two runs on the same input (1 for a deterministic method); normalized: (similarity - floor) / "
                     "(ceiling - floor), nan when ceiling - floor is too small to tell.</p>")
    for tag in images:
        step, png, caption = run.images[tag][-1]
        text = caption or ("rows: methods, columns: the input, the original model's map, then each randomized stage"
                           if tag == "sanity/cascade" else "similarity to the original maps over the stages")
        parts.append(_figure(png, f"{tag} ({_when(run, step)}): {text}", tag))
    return "\n".join(parts)


def _saliency_section(run: RunLog, used: set[str], max_steps: int) -> str:
    tags = [t for t in run.images if t.startswith("saliency/")]
    if not tags:
        return ""
    parts = ['<h2 id="saliency">Saliency maps over epochs</h2>',
             '<p class="note">The same probes explained at each logged epoch, oldest first: watch where the maps '
             "settle as the model trains (on the digit, or on a shortcut).</p>"]
    for tag in tags:
        used.add(tag)
        series = _spread(run.images[tag], max_steps)
        parts.append(f"<h3>{_e(tag)}</h3>")
        if len(run.images[tag]) > len(series):
            parts.append(f'<p class="muted">{len(series)} of {len(run.images[tag])} logged steps shown, first and '
                         "last included.</p>")
        figures = "".join(_figure(png, f"{_when(run, step)}" + (f": {caption}" if caption else ""), f"{tag} {step}")
                          for step, png, caption in series)
        parts.append(f'<div class="steps">{figures}</div>')
    return "\n".join(parts)


#: put into every embedded page: nothing may be fetched, only inline styles and data: images
_FRAME_POLICY = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline';"
                 " img-src data:\">")


def embed_page(page: str, title: str) -> str:
    """A logged HTML page as a sandboxed ``<iframe>``: the page, with a content security policy that blocks every
    fetch, is the attribute-escaped ``srcdoc``; the empty ``sandbox`` runs no scripts, forms or plugins.

    Example:
        >>> frame = embed_page('<p title="a">x &lt; y</p>', "view")
        >>> frame.startswith('<iframe class="view" sandbox=""'), '&lt;p title=&quot;a&quot;&gt;x &amp;lt; y' in frame
        (True, True)
    """
    head = page.find("<head>")
    doc = page[: head + 6] + _FRAME_POLICY + page[head + 6 :] if head >= 0 else _FRAME_POLICY + page
    rows = page.count('class="lens-row"')  # token views: one row per probe
    height = min(720, 80 + 30 * max(rows, 2))
    return (f'<iframe class="view" sandbox="" referrerpolicy="no-referrer" title="{_e(title)}"'
            f' style="height:{height}px" srcdoc="{_e(doc)}"></iframe>')


def _pages_section(run: RunLog, max_steps: int) -> str:
    if not run.pages:
        return ""
    parts = ['<h2 id="views">Token views</h2>',
             '<p class="note">The HTML views the callbacks logged (text models: each probe\'s tokens coloured by their '
             "attribution, red positive, blue negative; hover a token for its score), oldest first.</p>"]
    for tag, series in run.pages.items():
        shown = _spread(series, max_steps)
        parts.append(f"<h3>{_e(tag)}</h3>")
        if len(series) > len(shown):
            parts.append(f'<p class="muted">{len(shown)} of {len(series)} logged steps shown, first and last '
                         "included.</p>")
        parts.extend(f'<p class="muted">{_e(_when(run, step))}</p>' + embed_page(page, f"{tag} {_when(run, step)}")
                     for step, page in shown)
    return "\n".join(parts)


def _slices_section(run: RunLog, used: set[str]) -> str:
    prefixes = sorted({t.rsplit("/", 1)[0] for t in list(run.texts) + list(run.json) + list(run.images)
                       if t.endswith(("/top", "/all", "/worst_examples"))
                       and (t.rsplit("/", 1)[0] + "/top" in run.texts or t.rsplit("/", 1)[0] + "/all" in run.json)})
    if not prefixes:
        return ""
    parts = ['<h2 id="slices">Error slices</h2>',
             '<p class="note">Subgroups of the validation data where the model errs significantly more than on the '
             "rest (Fisher test with false-discovery-rate control): where to look for a shortcut, a mislabeled group "
             "or a blind spot.</p>"]
    for prefix in prefixes:
        data = run.latest_json(f"{prefix}/all")
        parts.append(f"<h3>{_e(prefix)}</h3>")
        if data is not None:
            used.add(f"{prefix}/all")
            acc = data.get("overall_accuracy")
            found = data.get("slices", [])
            parts.append(f"<p>Epoch {_e(data.get('epoch', '?'))}: {_e(data.get('n_samples', '?'))} samples, overall "
                         f"accuracy {_e(format_number(acc))}; {len(found)} significant slice(s).</p>")
            if found:
                rows = "".join(
                    f"<tr><td>{i + 1}</td><td>{_e(s.get('name', '?'))}</td><td class=\"num\">{_e(s.get('size', ''))}"
                    f"</td><td class=\"num\">{_e(_slice_accuracy(s))}</td>"
                    f"<td class=\"num\">{_e(format_number(1 - s['rest_rate']) if 'rest_rate' in s else '')}</td>"
                    f"<td class=\"num\">{_e(format_number(s.get('q_value')))}</td></tr>"
                    for i, s in enumerate(found[:15]))
                parts.append("<table><tr><th>rank</th><th>slice</th><th>size</th><th>accuracy</th>"
                             "<th>accuracy elsewhere</th><th>q (FDR-adjusted p)</th></tr>" + rows + "</table>")
        top = run.texts.get(f"{prefix}/top")
        if top:
            used.add(f"{prefix}/top")
            parts.append(f"<details><summary>the full table ({_e(_when(run, top[-1][0]))})</summary>"
                         + markdown_to_html(top[-1][1]) + "</details>")
        worst = run.images.get(f"{prefix}/worst_examples")
        if worst:
            used.add(f"{prefix}/worst_examples")
            step, png, caption = worst[-1]
            parts.append(_figure(png, f"{_when(run, step)}: " + (caption or "misclassified members of the worst "
                                                                  "slice, highest loss first"), "worst examples"))
    return "\n".join(parts)


def _slice_accuracy(s: dict) -> str:
    """A slice's accuracy from its JSON entry (``1 - error_rate`` for error slices)."""
    if "accuracy" in s:
        return format_number(s["accuracy"])
    if s.get("measure", "error") == "error" and "error_rate" in s:
        return format_number(1 - s["error_rate"])
    return "nan"


def _curves_section(run: RunLog) -> str:
    families = _scalar_families(run.scalars)
    if not families:
        return ""
    figures = "".join(_figure(_plot_png(key, series), key, key, css="plot") for key, series in families)
    return ('<h2 id="curves">Curves</h2><p class="note">Every scalar logged at two or more steps; a metric and its '
            "chance level (dashed) share a chart.</p>" + f'<div class="plots">{figures}</div>')


def _values_section(run: RunLog) -> str:
    """Scalars logged at a single step (a check at the end of fit, a method run once): a table, a metric beside its
    ``_chance`` level. The sanity check's scalars are left out when its report (shown above) is there."""
    skip = "sanity/" if run.latest_json("sanity/report") is not None else None
    single = {t: v for t, v in run.scalars.items() if len({s for s, _ in v}) == 1 and not _SKIP_SCALARS.search(t)
              and not (skip and t.startswith(skip))}
    rows = []
    for tag, points in sorted(single.items()):
        if tag.endswith("_chance") and tag[: -len("_chance")] in single:
            continue
        chance = single.get(tag + "_chance")
        rows.append(f"<tr><td>{_e(tag)}</td><td class=\"num\">{_e(format_number(points[-1][1]))}</td>"
                    f"<td class=\"num\">{_e(format_number(chance[-1][1]) if chance else '')}</td>"
                    f"<td>{_e(_when(run, points[-1][0]))}</td></tr>")
    if not rows:
        return ""
    return ('<h2 id="values">Values logged once</h2><p class="muted">Scalars with a single logged step; chance: the '
            "value a map spread evenly would get (the region's share of the image).</p><div class=\"scroll\"><table>"
            "<tr><th>scalar</th><th>value</th><th>chance</th><th>logged at</th></tr>" + "".join(rows)
            + "</table></div>")


def _figures_section(run: RunLog, used: set[str]) -> str:
    tags = [t for t in run.images if t not in used]
    if not tags:
        return ""
    parts = ['<h2 id="figures">Figures</h2><p class="muted">The last logged step of every other image: MoE routing, '
             "concept interventions, kNN and TracIn galleries, ...</p>"]
    for tag in tags:
        step, png, caption = run.images[tag][-1]
        parts.append(_figure(png, f"{tag} ({_when(run, step)})" + (f": {caption}" if caption else ""), tag))
    return "\n".join(parts)


def _tables_section(run: RunLog, used: set[str]) -> str:
    tags = [t for t in run.texts if t not in used and not t.startswith("lens_errors/")]
    if not tags:
        return ""
    parts = ['<h2 id="tables">Tables and notes</h2>']
    for tag in tags:
        step, text = run.texts[tag][-1]
        parts.append(f"<h3>{_e(tag)} <span class=\"muted\">({_e(_when(run, step))})</span></h3>"
                     + markdown_to_html(text))
    return "\n".join(parts)


def _errors_section(run: RunLog) -> str:
    tags = [t for t in run.texts if t.startswith("lens_errors/")]
    if not tags:
        return ""
    items = "".join(f"<li><b>{_e(t)}</b> ({_e(_when(run, s))}): {_e(_unescape_sink(x))}</li>"
                    for t in tags for s, x in run.texts[t])
    return f'<h2 id="errors">Reported failures</h2><ul>{items}</ul>'


def _headline(run: RunLog) -> str:
    items = []
    for tag in ("val/acc", "val/loss", "train/loss_epoch"):
        series = run.scalars.get(tag)
        if series:
            items.append(f"{tag} {format_number(series[-1][1])} (step {series[-1][0]})")
    return f'<p>{_e("; ".join(items))}</p>' if items else ""


def _run_name(path: str, root: str) -> str:
    """The run's path from the log directory's own name down (``lens_logs/quickstart/version_0``)."""
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(root)))


def render_run(run: RunLog, root: str, max_steps: int = 6) -> str:
    """The HTML of one run's sections (no page frame)."""
    used: set[str] = set()
    name = _run_name(run.path, root)
    sections = [
        _sanity_section(run, used), _saliency_section(run, used, max_steps), _pages_section(run, max_steps),
        _slices_section(run, used),
        _figures_section(run, used), _curves_section(run), _values_section(run), _tables_section(run, used),
        _errors_section(run),
    ]
    sections = [s for s in sections if s]
    prefix = _anchor(name)
    sections = [s.replace('<h2 id="', f'<h2 id="{prefix}-', 1) for s in sections]  # unique ids over several runs
    titles = [(m.group(1), m.group(2)) for m in (re.search(r'<h2 id="([^"]+)">([^<]+)</h2>', s) for s in sections)
              if m]
    toc = ("<nav>" + "".join(f'<a href="#{_e(i)}">{_e(t)}</a>' for i, t in titles) + "</nav>") if titles else ""
    body = toc + "\n".join(sections)
    if not body:
        body = "<p>Nothing the callbacks log was found in this run.</p>"
    return (f'<section id="{_e(prefix)}"><h1>Run {_e(name)}</h1><p class="muted">read from '
            f"{_e(run.source or 'nothing')} in {_e(os.path.abspath(run.path))}</p>{_headline(run)}\n{body}</section>")


def build_report(log_dir: str, max_steps: int = 6, title: Optional[str] = None) -> str:
    """The whole page for every run under ``log_dir`` (see the module docstring).

    Args:
        log_dir: a log directory (a TensorBoard or CSV logger's, or a folder holding several runs).
        max_steps: how many logged steps of each saliency map to show (spread over the run, first and last kept).
        title: the page title (default: the log directory's name).

    Raises:
        FileNotFoundError: when ``log_dir`` does not exist.
        ValueError: when it holds no run.

    Example:
        >>> build_report("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: log_dir '/nonexistent' does not exist; pass the folder given to the logger (e.g. lens_logs)
    """
    if not os.path.isdir(log_dir):
        raise FileNotFoundError(f"log_dir {log_dir!r} does not exist; pass the folder given to the logger (e.g."
                                " lens_logs)")
    runs = [read_run(path) for path in find_runs(log_dir)]
    runs = [r for r in runs if not r.empty]
    if not runs:
        raise ValueError(f"log_dir {log_dir!r} holds no TensorBoard event files, lens/ artifacts or metrics.csv;"
                         " pass the folder given to TensorBoardLogger/CSVLogger")
    title = title or f"lightning-lens report: {os.path.basename(os.path.abspath(log_dir))}"
    nav = ""
    if len(runs) > 1:
        links = []
        for r in runs:
            name = _run_name(r.path, log_dir)
            links.append(f'<a href="#{_e(_anchor(name))}">{_e(name)}</a>')
        nav = "<nav>Runs: " + "".join(links) + "</nav>"
    body = "\n<hr>\n".join(render_run(r, log_dir, max_steps) for r in runs)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body>{nav}\n{body}\n</body></html>\n")


def write_report(log_dir: str, output: Optional[str] = None, max_steps: int = 6) -> str:
    """Build the page and write it to ``output`` (default ``<log_dir>/report.html``); returns the path written."""
    page = build_report(log_dir, max_steps=max_steps)
    output = output or os.path.join(log_dir, "report.html")
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(page)
    return output


def report_command(log_dir: str, output: Optional[str] = None) -> str:
    """The shell command that writes the report of ``log_dir`` to ``output`` (default ``<log_dir>/report.html``), with
    this interpreter (as a relative path when it lies below the working directory), for scripts to print.

    Example:
        >>> report_command("lens_logs").endswith(" -m lightning_lens report lens_logs -o lens_logs/report.html")
        True
    """
    python = sys.executable if os.path.relpath(sys.executable).startswith("..") else os.path.relpath(sys.executable)
    output = output or os.path.join(log_dir, "report.html")
    return f"{python} -m lightning_lens report {log_dir} -o {output}"
