"""Render runs (:mod:`mathrl.report.build`) as one self-contained HTML page.

Everything is rendered here, server-side: curves as inline SVG (one ``<path class="series">``
per series, one point per logged finite value, ``data-points`` its count), tables, and every
sample view as a ``<section>``, all but one ``hidden``. The page's script only switches the
visible view and filters completions right/wrong; it reads nothing and fetches nothing. All
text from a run (model output above all: it is untrusted) goes through :func:`esc`, so a
completion that writes ``</script><script>...`` shows as text.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from mathrl.report.build import Chart, Completion, Group, RunData, Table, Turn, View
from mathrl.report.config import ReportConfig

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")  # fmt: skip
DASHES = ("", "6 3", "2 3", "9 3 2 3")
W, H = 440, 220
LEFT, RIGHT, TOP, BOTTOM = 54, 10, 10, 30
MARKERS_UP_TO = 40  # series with at most this many points get a marker (with its value) per point


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def render(runs: Sequence[RunData], main: Sequence[Chart], other: Sequence[Chart], cfg: ReportConfig) -> str:
    """The whole page."""
    labels = [r.label for r in runs]
    title = f"mathrl report: {labels[0]}" if len(runs) == 1 else "mathrl comparison: " + " vs ".join(labels)
    sections = [
        ("summary", "Summary", _summary(runs)),
        ("config", "Config", _config(runs)),
        ("curves", "Curves", _curves(main, other, runs)),
        ("evaluation", "Evaluation", _tables(runs)),
        ("samples", "Samples", _samples(runs, cfg)),
        ("checkpoints", "Checkpoints", _checkpoints(runs)),
    ]
    nav = " · ".join(f'<a href="#{key}">{name}</a>' for key, name, _ in sections)
    body = "\n".join(f'<section id="{key}"><h2>{name}</h2>\n{content}</section>' for key, name, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>{esc(title)}</h1>
<p class="meta">written {datetime.now():%Y-%m-%d %H:%M:%S} by mathrl report · {nav}</p></header>
{body}
<script>{JS}</script>
</body></html>
"""


# --- summary and config ------------------------------------------------------------------------


def _summary(runs: Sequence[RunData]) -> str:
    rows = []
    for run in runs:
        train = next((r for r in reversed(run.rows) if "env/all/reward/total" in r), None)
        reward = f"{train['env/all/reward/total']:.3f} at step {train['step']}" if train else "-"
        steps = max((r["step"] for r in run.rows), default=None)
        rows.append([run.label, run.kind, run.path, "-" if steps is None else str(steps), reward, run.headline])
    table = Table("", ["run", "kind", "directory", "last step", "train reward", "result [95% CI]"], rows)
    notes = [f"<li>{esc(run.label)}: {esc(n)}</li>" for run in runs for n in run.notes]
    return _table(table) + (f"<ul class='notes'>{''.join(notes)}</ul>" if notes else "")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"env_args": {"a": 1}}`` -> ``{"env_args.a": "1"}``; values as JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def _config(runs: Sequence[RunData]) -> str:
    """The resolved config; for several runs a column each for the keys that differ, then the rest."""
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    if not keys:
        return "<p class='meta'>no config.json</p>"
    differ = [k for k in keys if len({f.get(k, "—") for f in flat}) > 1]
    same = "".join(f"<div><b>{esc(k)}</b> = <code>{esc(flat[0][k])}</code></div>" for k in keys if k not in differ)
    if len(runs) == 1:
        return f"<details open><summary>{len(keys)} keys</summary><div class='kv'>{same}</div></details>"
    head = "".join(f"<th>{esc(r.label)}</th>" for r in runs)
    rows = "".join(
        f"<tr><th>{esc(k)}</th>" + "".join(f"<td>{esc(f.get(k, '—'))}</td>" for f in flat) + "</tr>" for k in differ
    )
    return (
        f"<h3>{len(differ)} keys differ</h3><table class='config'><tr><th>key</th>{head}</tr>{rows}</table>"
        f"<details><summary>{len(keys) - len(differ)} keys equal in every run</summary><div class='kv'>{same}</div>"
        "</details>"
    )


# --- curves ------------------------------------------------------------------------------------


def _curves(main: Sequence[Chart], other: Sequence[Chart], runs: Sequence[RunData]) -> str:
    if not main and not other:
        return "<p class='meta'>no metrics logged</p>"
    several = len(runs) > 1
    run_index = {r.label: i for i, r in enumerate(runs)}
    grid = "".join(chart_svg(c, run_index, several) for c in main)
    more = "".join(chart_svg(c, run_index, several) for c in other)
    extra = (
        f"<details><summary>{len(other)} more metrics</summary><div class='charts'>{more}</div></details>"
        if other
        else ""
    )
    return f"<div class='charts'>{grid}</div>{extra}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values: Iterable[float]) -> tuple[float, float]:
    vals = list(values)
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 0.5
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def chart_svg(chart: Chart, run_index: dict[str, int], several: bool) -> str:
    """One chart card: an SVG with one ``<path class="series">`` per series (its points
    ``M``/``L`` commands, a new ``M`` after a gap) and a band path per confidence interval."""
    xs = [x for s in chart.series for x, _ in s.points] + [x for b in chart.bands for x, _, _ in b.points]
    ys = [y for s in chart.series for _, y in s.points if y is not None]
    ys += [v for b in chart.bands for _, lo, hi in b.points for v in (lo, hi) if math.isfinite(v)]
    if not ys:
        ys = [0.0]
    x0, x1 = (min(xs) - 0.5, max(xs) + 0.5) if max(xs) == min(xs) else (min(xs), max(xs))
    y0, y1 = _range(ys)

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM)

    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" class="frame"/>']
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                     f'<text x="{LEFT - 4}" y="{py(t) + 3:.1f}" class="ty">{_fmt(t)}</text>')  # fmt: skip
    for t in _ticks(x0, x1):
        if t == int(t):
            parts.append(f'<text x="{px(t):.1f}" y="{H - BOTTOM + 13}" class="tx">{int(t)}</text>')
    parts.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 3}" class="tx">step</text>')
    styles = {}
    for i, s in enumerate(chart.series):
        key_index = [k for k in dict.fromkeys(t.key for t in chart.series)].index(s.key)
        color = PALETTE[(run_index[s.run] if several else i) % len(PALETTE)]
        styles[(s.run, s.key)] = (color, DASHES[key_index % len(DASHES)] if several else "")
    for b in chart.bands:
        color = styles.get((b.run, b.key), (PALETTE[0], ""))[0]
        upper = " L".join(f"{px(x):.1f},{py(hi):.1f}" for x, _, hi in b.points)
        lower = " L".join(f"{px(x):.1f},{py(lo):.1f}" for x, lo, _ in reversed(b.points))
        parts.append(f'<path class="band" data-run="{esc(b.run)}" data-key="{esc(b.key)}" fill="{color}" '
                     f'd="M{upper} L{lower} Z"><title>95% interval</title></path>')  # fmt: skip
    legend = []
    for i, s in enumerate(chart.series):
        color, dash = styles[(s.run, s.key)]
        d, pen = [], "M"
        for x, y in s.points:
            if y is None:
                pen = "M"
                continue
            d.append(f"{pen}{px(x):.1f},{py(y):.1f}")
            pen = "L"
        n = len(d)
        label = f"{s.run}: {s.label}" if several else s.label
        last = next((y for _, y in reversed(s.points) if y is not None), None)
        parts.append(
            f'<path class="series" data-run="{esc(s.run)}" data-key="{esc(s.key)}" data-label="{esc(label)}" '
            f'data-points="{n}" '
            f'stroke="{color}" stroke-dasharray="{dash}" d="{" ".join(d)}">'
            f"<title>{esc(label)} (last {_fmt(last) if last is not None else '-'})</title></path>"
        )
        if n <= MARKERS_UP_TO:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{color}">'
                      f"<title>{esc(label)}: step {_fmt(x)}: {_fmt(y)}</title></circle>"
                      for x, y in s.points if y is not None]  # fmt: skip
        same = next((t for t in chart.series[:i] if t.run == s.run and t.points == s.points), None)
        note = f" <span class='meta'>(= {esc(same.label)}, drawn over it)</span>" if same else ""
        legend.append(
            f'<li><svg width="26" height="8"><line x1="0" x2="26" y1="4" y2="4" stroke="{color}" '
            f'stroke-dasharray="{dash}" stroke-width="2"/></svg>{esc(label)}{note}</li>'
        )
    # The plot area and the data range it shows: the hover readout maps a point back to its step and value.
    area = f'data-plot="{LEFT},{TOP},{W - LEFT - RIGHT},{H - TOP - BOTTOM}" data-range="{x0},{x1},{y0},{y1}"'
    svg = f'<svg viewBox="0 0 {W} {H}" role="img" {area}>{"".join(parts)}</svg>'
    caption = f"<figcaption>{esc(chart.title)}</figcaption>"
    readout = "<div class='readout meta'>&nbsp;</div>"
    return f"<figure class='chart'>{caption}{svg}{readout}<ul class='legend'>{''.join(legend)}</ul></figure>"


# --- tables and checkpoints --------------------------------------------------------------------


def _table(t: Table) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    caption = f"<h3>{esc(t.title)}</h3>" if t.title else ""
    note = f"<p class='meta'>{esc(t.note)}</p>" if t.note else ""
    return f"{caption}<table class='data'><tr>{head}</tr>{body}</table>{note}"


def _tables(runs: Sequence[RunData]) -> str:
    out = []
    for run in runs:
        prefix = f"<h3 class='run'>{esc(run.label)}</h3>" if len(runs) > 1 else ""
        out.append(prefix + ("".join(_table(t) for t in run.tables) or "<p class='meta'>no evaluation logged</p>"))
    return "".join(out)


def _checkpoints(runs: Sequence[RunData]) -> str:
    out = []
    for run in runs:
        if run.kind not in ("train", "sft"):
            continue
        rows = [[str(c["step"]), c["path"], "final" if c["final"] else "", "" if c["exists"] else "missing"]
                for c in run.checkpoints]  # fmt: skip
        table = Table(run.label if len(runs) > 1 else "", ["step", "path", "", "on disk"], rows)
        out.append(_table(table) if rows else f"<p class='meta'>{esc(run.label)}: no checkpoint yet</p>")
    return "".join(out) or "<p class='meta'>no checkpoints (not a training run)</p>"


# --- the sample browser ------------------------------------------------------------------------


def _samples(runs: Sequence[RunData], cfg: ReportConfig) -> str:
    views = [(i, run, v) for i, run in enumerate(runs) for v in run.views]
    if not views:
        return "<p class='meta'>no samples in this run (rollouts, test or benchmark rows)</p>"
    first = next(i for i, run, _ in views)  # the first run with samples: its last training step, else its last view
    trained = [v for v in runs[first].views if v.key.startswith("train-")]
    default = f"r{first}:{(trained or runs[first].views)[-1].key}"
    options = []
    for i, run in enumerate(runs):
        opts = "".join(
            f'<option value="r{i}:{esc(v.key)}"{" selected" * (f"r{i}:{v.key}" == default)}>{esc(v.name)}</option>'
            for v in run.views
        )
        options.append(f'<optgroup label="{esc(run.label)}">{opts}</optgroup>' if opts else "")
    controls = (
        '<div class="controls"><button id="prev" type="button">◀</button>'
        f'<select id="view">{"".join(options)}</select><button id="next" type="button">▶</button>'
        '<span class="filter">show <label><input type="radio" name="filter" value="all" checked> all</label>'
        '<label><input type="radio" name="filter" value="right"> right</label>'
        '<label><input type="radio" name="filter" value="wrong"> wrong</label></span>'
        '<span id="count" class="meta"></span></div>'
    )
    caps = (
        f"Per step: {cfg.groups_per_step} groups picked at evenly spaced quantiles of their mean reward (lowest "
        f"first, as tinker-cookbook logs them); at most {cfg.completions_per_group} completions per group (picked "
        f"the same way); texts over {cfg.max_chars} characters are cut in the middle; at most {cfg.sample_steps} "
        "steps (evenly spaced). Rebuild with `mathrl report` to change these caps."
    )
    sections = "".join(
        _view(f"r{i}:{v.key}", v, f"r{i}:{v.key}" != default, run.label if len(runs) > 1 else "") for i, run, v in views
    )
    return f"<p class='meta'>{esc(caps)}</p>{controls}{sections}"


def _view(key: str, view: View, hidden: bool, run: str) -> str:
    head = f"{run}: {view.name}" if run else view.name
    meta = f"{len(view.groups)} of {view.total} groups"
    groups = "".join(_group(g) for g in view.groups)
    return (f'<section class="view" data-view="{esc(key)}"{" hidden" if hidden else ""}><h3>{esc(head)}</h3>'
            f"<p class='meta'>{esc(meta)}</p>{groups}</section>")  # fmt: skip


def _group(g: Group) -> str:
    shown = f"{len(g.completions)} of {g.total}" if len(g.completions) < g.total else str(g.total)
    head = f"{g.title} · mean reward {g.mean_reward:.3f} · reference {g.reference} · {shown} completions"
    tail = " ".join(g.prompt.split())[-160:]
    prompt = (f"<details><summary>prompt: <code>…{esc(tail)}</code></summary><pre>{esc(g.prompt)}</pre></details>"
              if g.prompt else "<p class='meta'>prompt not recorded (tool episodes: see each turn)</p>")  # fmt: skip
    body = "".join(_completion(c) for c in g.completions)
    return (f'<article class="group" data-mean="{g.mean_reward:.4f}"><h4>{esc(head)}</h4>{prompt}{body}'
            '<p class="empty meta" hidden>no completion of this group matches the filter</p></article>')  # fmt: skip


def _completion(c: Completion) -> str:
    flag = "" if c.correct is None else ("1" if c.correct else "0")
    badges = []
    if c.correct is not None:
        badges.append('<span class="ok">✓ right</span>' if c.correct else '<span class="bad">✗ wrong</span>')
    if c.reward is not None:
        badges.append(f"reward {c.reward:.3f}")
    if c.advantage is not None:
        badges.append(f"advantage {c.advantage:+.3f}")
    elif c.trained:
        badges.append("no advantage (no reward spread in its group: not trained on)")
    badges.append(f"answer <code>{esc(c.answer) if c.answer is not None else '(none)'}</code> vs reference "
                  f"<code>{esc(c.reference)}</code>")  # fmt: skip
    if c.truncated:
        badges.append('<span class="trunc">truncated (max_tokens)</span>')
    if len(c.turns) > 1:
        badges.append(f"{len(c.turns)} turns")
        body = "<ol class='turns'>" + "".join(_turn(t) for t in c.turns) + "</ol>"
    else:
        body = f"<pre>{esc(c.text)}</pre>" + "".join(_turn(t, bare=True) for t in c.turns if t.tool_calls)
    return f'<div class="completion" data-correct="{flag}"><div class="badges">{" · ".join(badges)}</div>{body}</div>'


def _turn(t: Turn, bare: bool = False) -> str:
    calls = []
    for k in t.tool_calls:
        status = f'<span class="bad">error: {esc(k.error)}</span>' if k.error else '<span class="ok">ok</span>'
        took = f" · {k.seconds:.2f} s" if k.seconds is not None else ""
        lost = ' · <span class="bad">state lost</span>' if k.state_lost else ""
        calls.append(f"<div class='call'><div class='meta'>python call · {status}{took}{lost}</div>"
                     f"<pre class='code'>{esc(k.code)}</pre><pre class='out'>{esc(k.output)}</pre></div>")  # fmt: skip
    calls += [f"<div class='call'><span class='bad'>error: parse</span><pre class='out'>{esc(e)}</pre></div>"
              for e in t.parse_errors]  # fmt: skip
    if bare:
        return "".join(calls)
    end = f"<span class='trunc'>ended: {esc(t.finish_reason)}</span>" if t.finish_reason not in ("stop", "") else ""
    return f"<li><pre>{esc(t.text)}</pre>{end}{''.join(calls)}</li>"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1400px;
padding:0 18px 40px;color:#222}
h1{font-size:20px;margin:16px 0 2px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}
h3{font-size:15px;margin:14px 0 6px}h4{font-size:13px;margin:0 0 6px}
.meta{color:#666;font-size:12px}a{color:#1f5fa8}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
table.data td{font-variant-numeric:tabular-nums}table.config td{font-family:ui-monospace,monospace;word-break:break-all}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(450px,1fr));gap:10px}
figure.chart>svg{width:100%;max-width:660px;height:auto;display:block}
.kv{columns:3 320px;font-size:12.5px}.kv div{break-inside:avoid;padding:1px 0}.kv code{word-break:break-all}
figure.chart{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:6px}figcaption{font-weight:600;font-size:13px}
svg .frame{fill:none;stroke:#bbb}svg .grid{stroke:#eee}svg text{font-size:10px;fill:#555}
svg .ty{text-anchor:end}svg .tx{text-anchor:middle}
path.series{fill:none;stroke-width:1.8}path.band{opacity:.15;stroke:none}
ul.legend{list-style:none;padding:0;margin:2px 0;font-size:12px}ul.legend li{display:inline-block;margin-right:12px}
ul.legend svg{vertical-align:middle;margin-right:4px}
.controls{position:sticky;top:0;background:#fafafa;border:1px solid #ddd;padding:6px;border-radius:6px;z-index:1}
.controls select{max-width:420px}.filter{margin:0 12px}.filter label{margin-right:8px}
article.group{border:1px solid #ddd;border-radius:6px;padding:8px;margin:10px 0}
.completion{border-left:4px solid #bbb;margin:8px 0;padding:2px 8px}
.completion[data-correct="1"]{border-color:#2ca02c}.completion[data-correct="0"]{border-color:#d62728}
.badges{font-size:12.5px}.ok{color:#1d7a1d;font-weight:600}.bad{color:#b22;font-weight:600}.trunc{color:#b36b00;font-weight:600}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:6px;margin:4px 0;
font-size:12.5px;max-height:420px;overflow:auto}
pre.code{background:#eef4fb}pre.out{background:#f4f4ea}.call{margin-left:14px}ol.turns{padding-left:22px}
[hidden]{display:none!important}
"""

JS = """
// Hovering a chart reads out, for each series, the value at the logged step nearest the pointer.
for (const svg of document.querySelectorAll('figure.chart > svg')) {
  const [left, top, width, height] = svg.dataset.plot.split(',').map(Number);
  const [x0, x1, y0, y1] = svg.dataset.range.split(',').map(Number);
  const readout = svg.parentElement.querySelector('.readout');
  const series = [...svg.querySelectorAll('path.series')].map(p => ({
    label: p.dataset.label,
    points: (p.getAttribute('d').match(/-?[0-9.]+,-?[0-9.]+/g) || []).map(xy => xy.split(',').map(Number)),
  }));
  const value = py => Number((y1 - (py - top) / height * (y1 - y0)).toPrecision(4));
  svg.addEventListener('mousemove', event => {
    const box = svg.getBoundingClientRect();
    const px = (event.clientX - box.left) / box.width * svg.viewBox.baseVal.width;
    const parts = [];
    let step = null;
    for (const s of series) {
      const near = s.points.reduce((a, b) => (a && Math.abs(a[0] - px) <= Math.abs(b[0] - px) ? a : b), null);
      if (!near || Math.abs(near[0] - px) > 12) continue;
      step = step ?? Math.round(x0 + (near[0] - left) / width * (x1 - x0));
      parts.push(`${s.label} ${value(near[1])}`);
    }
    readout.textContent = step === null ? '\u00a0' : `step ${step}: ${parts.join(' · ')}`;
  });
  svg.addEventListener('mouseleave', () => { readout.textContent = '\u00a0'; });
}

(() => {
  const select = document.getElementById('view');
  if (!select) return;
  const views = [...document.querySelectorAll('section.view')];
  const count = document.getElementById('count');
  function filter() {
    const want = document.querySelector('input[name=filter]:checked').value;
    let shown = 0, total = 0;
    for (const view of views.filter(v => !v.hidden)) {
      for (const c of view.querySelectorAll('.completion')) {
        c.hidden = want !== 'all' && c.dataset.correct !== (want === 'right' ? '1' : '0');
        total += 1;
        shown += c.hidden ? 0 : 1;
      }
      for (const g of view.querySelectorAll('.group')) {
        g.querySelector('.empty').hidden = g.querySelector('.completion:not([hidden])') !== null;
      }
    }
    count.textContent = `${shown} of ${total} completions shown`;
  }
  function show() {
    for (const v of views) v.hidden = v.dataset.view !== select.value;
    filter();
  }
  function move(by) {
    const i = select.selectedIndex + by;
    if (i >= 0 && i < select.options.length) { select.selectedIndex = i; show(); }
  }
  select.addEventListener('change', show);
  document.getElementById('prev').addEventListener('click', () => move(-1));
  document.getElementById('next').addEventListener('click', () => move(1));
  for (const r of document.querySelectorAll('input[name=filter]')) r.addEventListener('change', filter);
  show();
})();
"""
