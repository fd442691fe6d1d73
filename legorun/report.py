"""``legorun report``: draw a run's statistics or a benchmark's results.

Usage::

    legorun report FILE.json [-o OUT.html|OUT.png] [--title TEXT]

FILE is one of:

* a run's statistics, as written by ``legorun --stats-json FILE``. Keys read:
  ``syscalls`` ({name: {count, errors, time_s}}), ``rpcs`` ({component:
  {op: {count, errors, seconds, bytes_sent, bytes_received}}}), and every
  top-level number (``ptrace_stops``, ``trapped``, ...) for the summary table.
  Optional keys, drawn when present:

  - ``timeline``: ``[{"t": s, "resident_pages": n, "faults": n}, ...]``,
    samples of the ExCache over the run, in time order. ``t`` is seconds
    since the guest started, ``resident_pages`` the pages held in the
    ExCache at that moment, ``faults`` the number of faults served since
    the start (a running total: the fault rate drawn is its slope between
    samples). Entries may also carry ``capacity_pages`` (the ExCache size,
    drawn as a dashed line) and ``evictions`` (a running total, drawn as a
    rate like faults);
  - ``fault_latency_us``: ``[µs, ...]``, the time to serve each fault (or a
    sample of them), drawn as a histogram with its median and p99;
  - ``excache``: ``{counter: number}`` (hits, misses, evictions ...), drawn
    as bars; non-numeric entries are ignored.

* a benchmark's results, as written by ``legorun bench --json`` (keys read:
  ``command``, ``modes``, ``summary.{mode}.wall_s.{median,min,max}``,
  ``slowdown.{mode}.median``, ``ok``, ``n``), or a suite of them: a JSON list
  of such documents, or an object mapping a benchmark's name to one (or
  holding them under ``"benchmarks"``); a document's ``title`` or ``name``
  key, if any, names its bars. Drawn: per benchmark, the median wall time of
  each mode (native, legorun, ...) with min-max whiskers and the slowdown;
  for a suite, also the median slowdowns side by side.

The output's format follows its extension: ``.html`` (default: FILE with
.html) is a self-contained page (the figures are PNGs embedded as base64
data: URIs, tables of the figures' numbers, no script, no external file) that
opens offline; ``.png`` (or ``.svg``, ``.pdf``) is one image with every
panel. Drawn with matplotlib's Agg backend, no display needed.

Exit status: 0 written; 2 the input cannot be read or is neither kind of
document, or the output cannot be written (one line on stderr).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import html
import io
import json
import math
import os
import sys
import textwrap
from typing import Any, Callable

USAGE = "legorun report FILE.json [-o OUT.html|OUT.png] [--title TEXT]"

# Colours: the colour-blind-safe Okabe-Ito palette.
BLUE, ORANGE, GREEN, VERMILION, SKY, PURPLE, YELLOW, GREY = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#999999")
MODE_COLOURS = {"native": BLUE, "legorun": ORANGE}
CYCLE = [GREEN, PURPLE, SKY, VERMILION, YELLOW, GREY]
MAX_BARS = 24  # longer lists keep their top entries and lump the rest


class ReportError(Exception):
    """One line for the user."""


@dataclasses.dataclass
class Section:
    """One titled group of panels: drawn in a grid of nrows x ncols axes."""
    title: str
    draw: Callable[[list], None]
    ncols: int = 1
    nrows: int = 1
    height: float = 3.0   # inches, the whole section
    width: float = 11.0   # inches
    table: tuple | None = None  # (header, rows) shown under the image in HTML
    note: str = ""


# --------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------

def is_bench(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("summary"), dict) and "modes" in doc


def is_stats(doc: Any) -> bool:
    return isinstance(doc, dict) and any(k in doc for k in ("syscalls", "rpcs", "ptrace_stops"))


def bench_entries(doc: Any) -> list:
    """[(title, bench document)] of a bench JSON or a suite of them; [] if neither."""
    if is_bench(doc):
        return [(bench_title(doc), doc)]
    if isinstance(doc, dict) and "benchmarks" in doc:
        return bench_entries(doc["benchmarks"])
    if isinstance(doc, list) and doc and all(is_bench(d) for d in doc):
        return [(bench_title(d), d) for d in doc]
    if isinstance(doc, dict) and doc and all(is_bench(d) for d in doc.values()):
        return [(bench_title(d, key), d) for key, d in doc.items()]
    return []


def bench_title(doc: dict, key: str | None = None) -> str:
    for k in ("title", "name"):
        if isinstance(doc.get(k), str) and doc[k]:
            return doc[k]
    if key:
        return str(key)
    words = []
    for arg in doc.get("command") or []:
        arg = str(arg)
        words.append(os.path.basename(arg) if arg.startswith("/") else arg)
    text = " ".join(words) or "benchmark"
    return text if len(text) <= 48 else text[:47] + "…"


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def _top(items: list, key: Callable, combine: Callable, limit: int = MAX_BARS) -> list:
    """Sort by key (largest first); beyond `limit`, lump the rest into one item."""
    items = sorted(items, key=key, reverse=True)
    if len(items) <= limit:
        return items
    rest = items[limit - 1:]
    return items[:limit - 1] + [combine(f"other ({len(rest)})", rest)]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _bytes_scale(max_bytes: float) -> tuple[float, str]:
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if max_bytes >= 4 * div:
            return div, unit
    return 1, "bytes"


def percentile(values: list, p: float) -> float:
    v = sorted(values)
    if not v:
        return 0.0
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# --------------------------------------------------------------------------
# Panels: a run's statistics
# --------------------------------------------------------------------------

def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=GREY)
    ax.set_xticks([])
    ax.set_yticks([])


def _bar_height(n: int) -> float:
    return max(2.6, 0.26 * n + 1.3)


def syscalls_section(stats: dict) -> Section:
    sc = stats.get("syscalls") or {}
    rows = [(name, int(_num(v.get("count"))), int(_num(v.get("errors"))), _num(v.get("time_s")))
            for name, v in sc.items() if isinstance(v, dict)]
    rows = _top(rows, key=lambda r: (r[3], r[1]),
                combine=lambda label, rest: (label, sum(r[1] for r in rest),
                                             sum(r[2] for r in rest), sum(r[3] for r in rest)))

    def draw(axes):
        a_count, a_time = axes
        if not rows:
            _empty(a_count, "no forwarded syscalls")
            a_time.set_visible(False)
            return
        names = [r[0] for r in rows][::-1]
        y = range(len(names))
        counts = [r[1] for r in rows][::-1]
        errors = [r[2] for r in rows][::-1]
        times = [r[3] * 1e3 for r in rows][::-1]
        a_count.barh(y, counts, color=BLUE, label="calls")
        if any(errors):
            a_count.barh(y, errors, color=VERMILION, label="errors")
        a_count.set_yticks(list(y), names)
        a_count.set_xlabel("calls")
        a_count.set_title("by count")
        a_count.legend(loc="lower right", fontsize="small")
        for yi, c, e in zip(y, counts, errors):
            a_count.annotate(f"{c} ({e} failed)" if e else f"{c}", (c, yi), xytext=(3, 0), textcoords="offset points",
                             va="center", fontsize="x-small")
        a_time.barh(y, times, color=ORANGE)
        a_time.set_yticks(list(y), names)
        a_time.set_xlabel("total time (ms)")
        a_time.set_title("by time (label: mean per call)")
        for yi, t, c in zip(y, times, counts):
            a_time.annotate(fmt_seconds(t / 1e3 / c) if c else "", (t, yi), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize="x-small")
        for ax in axes:
            ax.margins(x=0.22)
            ax.grid(axis="x", alpha=0.3)

    total_c = sum(r[1] for r in rows)
    table = (["syscall", "calls", "errors", "total time", "mean"],
             [[n, c, e or "", fmt_seconds(t), fmt_seconds(t / c) if c else ""]
              for n, c, e, t in rows])
    return Section(f"Forwarded syscalls ({total_c} calls)", draw, ncols=2,
                   height=_bar_height(len(rows)), table=table)


def rpcs_section(stats: dict) -> Section:
    rows = []  # (component, op, count, errors, seconds, sent, received)
    for comp, ops in (stats.get("rpcs") or {}).items():
        if not isinstance(ops, dict):
            continue
        for op, v in ops.items():
            if isinstance(v, dict):
                rows.append((comp, op or "(none)", int(_num(v.get("count"))), int(_num(v.get("errors"))),
                             _num(v.get("seconds")), _num(v.get("bytes_sent")),
                             _num(v.get("bytes_received"))))
    rows = _top(rows, key=lambda r: (r[2], r[5] + r[6]),
                combine=lambda label, rest: ("", label, *[sum(r[i] for r in rest) for i in range(2, 7)]))
    comps = list(dict.fromkeys(r[0] for r in rows if r[0]))
    colour = {c: ([ORANGE, GREEN, PURPLE, SKY] * 4)[i] for i, c in enumerate(comps)}

    def draw(axes):
        a_count, a_bytes = axes
        if not rows:
            _empty(a_count, "no RPCs")
            a_bytes.set_visible(False)
            return
        shown = rows[::-1]
        y = list(range(len(shown)))
        names = [f"{r[0]} {r[1]}".strip() if len(comps) > 1 else r[1] for r in shown]
        a_count.barh(y, [r[2] for r in shown], color=[colour.get(r[0], GREY) for r in shown])
        for yi, r in zip(y, shown):
            a_count.annotate(f"{r[2]}  ({fmt_seconds(r[4] / r[2])}/call)" if r[2] else "",
                             (r[2], yi), xytext=(3, 0), textcoords="offset points",
                             va="center", fontsize="x-small")
        a_count.set_yticks(y, names)
        a_count.set_xlabel("RPCs")
        a_count.set_title("by count (label: mean round trip)")
        div, unit = _bytes_scale(max(r[5] + r[6] for r in shown))
        sent = [r[5] / div for r in shown]
        recv = [r[6] / div for r in shown]
        a_bytes.barh(y, sent, color=BLUE, label="sent")
        a_bytes.barh(y, recv, left=sent, color=SKY, label="received")
        a_bytes.set_yticks(y, names)
        a_bytes.set_xlabel(f"{unit} (serialized messages)")
        a_bytes.set_title("by bytes")
        a_bytes.legend(loc="lower right", fontsize="small")
        for ax in axes:
            ax.margins(x=0.25)
            ax.grid(axis="x", alpha=0.3)

    table = (["component", "op", "RPCs", "errors", "mean", "sent", "received"],
             [[c, o, n, e or "", fmt_seconds(s / n) if n else "", fmt_bytes(bs), fmt_bytes(br)]
              for c, o, n, e, s, bs, br in rows])
    total = sum(r[2] for r in rows)
    what = f"by {comps[0]} op" if len(comps) == 1 else "by component and op"
    return Section(f"RPCs {what} ({total} RPCs)", draw, ncols=2,
                   height=_bar_height(len(rows)), table=table)


def _rate(ts: list, totals: list) -> tuple[list, list]:
    """Slope of a running total between samples: (midpoints, per second)."""
    xs, rs = [], []
    for (t0, c0), (t1, c1) in zip(zip(ts, totals), zip(ts[1:], totals[1:])):
        if t1 > t0:
            xs.append((t0 + t1) / 2)
            rs.append(max(0.0, (c1 - c0) / (t1 - t0)))
    return xs, rs


def timeline_section(stats: dict) -> Section | None:
    tl = [e for e in stats.get("timeline") or [] if isinstance(e, dict) and "t" in e]
    if not tl:
        return None
    tl.sort(key=lambda e: _num(e["t"]))
    ts = [_num(e["t"]) for e in tl]
    resident = [_num(e.get("resident_pages")) for e in tl]
    faults = [_num(e.get("faults")) for e in tl]
    caps = [_num(e["capacity_pages"]) for e in tl if "capacity_pages" in e]
    if not caps:
        ex = stats.get("excache") if isinstance(stats.get("excache"), dict) else {}
        for key in ("capacity_pages", "size_pages"):
            if key in ex:
                caps = [_num(ex[key])]
    has_evictions = any("evictions" in e for e in tl)
    evictions = [_num(e.get("evictions")) for e in tl]

    def draw(axes):
        ax, = axes
        ax.plot(ts, resident, color=BLUE, label="resident pages", drawstyle="steps-post")
        ax.fill_between(ts, resident, step="post", color=BLUE, alpha=0.15)
        if caps:
            ax.axhline(max(caps), color=BLUE, linestyle="--", linewidth=1,
                       label=f"ExCache size ({max(caps):.0f} pages)")
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("pages in ExCache", color=BLUE)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        rate_ax = ax.twinx()
        xs, rs = _rate(ts, faults)
        handles = []
        if xs:
            handles += rate_ax.plot(xs, rs, color=VERMILION, marker=".", label="faults/s")
        if has_evictions:
            ex, er = _rate(ts, evictions)
            if ex:
                handles += rate_ax.plot(ex, er, color=GREEN, marker=".", linestyle=":",
                                        label="evictions/s")
        rate_ax.set_ylabel("per second", color=VERMILION)
        rate_ax.set_ylim(bottom=0)
        h0, _ = ax.get_legend_handles_labels()
        ax.legend(handles=h0 + handles, loc="upper left", fontsize="small")

    note = (f"{len(tl)} samples over {ts[-1] - ts[0]:.2f} s; "
            f"peak {max(resident):.0f} resident pages; {faults[-1] - faults[0]:.0f} faults")
    return Section("ExCache occupancy and fault rate", draw, height=3.4, note=note)


def latency_section(stats: dict) -> Section | None:
    lat = [_num(x) for x in stats.get("fault_latency_us") or [] if _num(x) > 0]
    if not lat:
        return None
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    lo, hi = min(lat), max(lat)

    def draw(axes):
        ax, = axes
        if hi / lo > 50:
            n = 40
            bins = [lo * (hi / lo) ** (i / n) for i in range(n + 1)]
            ax.set_xscale("log")
        else:
            bins = min(40, max(5, len(set(lat))))
        ax.hist(lat, bins=bins, color=PURPLE, alpha=0.85)
        ax.axvline(p50, color="black", linestyle="--", linewidth=1, label=f"median {p50:.0f} µs")
        ax.axvline(p99, color=VERMILION, linestyle=":", linewidth=1.5, label=f"p99 {p99:.0f} µs")
        ax.set_xlabel("fault latency (µs)")
        ax.set_ylabel("faults")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)

    note = (f"{len(lat)} faults: min {lo:.0f} µs, median {p50:.0f} µs, p99 {p99:.0f} µs, "
            f"max {hi:.0f} µs")
    return Section("Fault latency", draw, height=3.0, note=note)


def excache_section(stats: dict) -> Section | None:
    ex = stats.get("excache")
    if not isinstance(ex, dict):
        return None
    items = [(k, _num(v)) for k, v in ex.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not items:
        return None

    def draw(axes):
        ax, = axes
        y = list(range(len(items)))[::-1]
        ax.barh(y, [v for _, v in items], color=GREEN)
        ax.set_yticks(y, [k.replace("_", " ") for k, _ in items])
        for yi, (_, v) in zip(y, items):
            ax.annotate(f"{v:g}", (v, yi), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize="x-small")
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)

    return Section("ExCache counters", draw, height=_bar_height(len(items)),
                   table=(["counter", "value"], [[k, f"{v:g}"] for k, v in items]))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def stats_summary(stats: dict) -> list:
    """(label, text) rows: every top-level number, then totals."""
    rows = [(k.replace("_", " "), f"{v:g}" if isinstance(v, float) else str(v))
            for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    sc = [v for v in (stats.get("syscalls") or {}).values() if isinstance(v, dict)]
    if sc:
        rows.append(("forwarded syscalls",
                     f"{sum(int(_num(v.get('count'))) for v in sc)} "
                     f"({_plural(sum(int(_num(v.get('errors'))) for v in sc), 'error')}), "
                     f"{fmt_seconds(sum(_num(v.get('time_s')) for v in sc))}"))
    for comp, ops in (stats.get("rpcs") or {}).items():
        if isinstance(ops, dict):
            vs = [v for v in ops.values() if isinstance(v, dict)]
            rows.append((f"{comp} RPCs",
                         f"{sum(int(_num(v.get('count'))) for v in vs)}, "
                         f"{fmt_bytes(sum(_num(v.get('bytes_sent')) for v in vs))} sent, "
                         f"{fmt_bytes(sum(_num(v.get('bytes_received')) for v in vs))} received"))
    return rows


def stats_sections(stats: dict) -> list:
    out = [syscalls_section(stats), rpcs_section(stats)]
    for make in (timeline_section, latency_section, excache_section):
        s = make(stats)
        if s is not None:
            out.append(s)
    return out


# --------------------------------------------------------------------------
# Panels: benchmark results
# --------------------------------------------------------------------------

def _mode_colour(mode: str, i: int) -> str:
    return MODE_COLOURS.get(mode) or CYCLE[i % len(CYCLE)]


def _bench_rows(doc: dict) -> list:
    """[(mode, median, min, max, slowdown or None)] of one bench document."""
    out = []
    summary = doc.get("summary") or {}
    slow = doc.get("slowdown") or {}
    for mode in doc.get("modes") or list(summary):
        w = (summary.get(mode) or {}).get("wall_s") or {}
        if not w:
            continue
        s = (slow.get(mode) or {}).get("median") if isinstance(slow.get(mode), dict) else None
        out.append((mode, _num(w.get("median")), _num(w.get("min", w.get("median"))),
                    _num(w.get("max", w.get("median"))), s))
    return out


def bench_sections(entries: list) -> list:
    n = len(entries)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)

    def draw(axes):
        for ax, (title, doc) in zip(axes, entries):
            rows = _bench_rows(doc)
            if not rows:
                _empty(ax, "no wall times")
                ax.set_title(title)
                continue
            x = list(range(len(rows)))
            med = [r[1] for r in rows]
            err = [[max(0.0, r[1] - r[2]) for r in rows], [max(0.0, r[3] - r[1]) for r in rows]]
            ax.bar(x, med, yerr=err, capsize=6, width=0.6,
                   color=[_mode_colour(r[0], i) for i, r in enumerate(rows)],
                   error_kw={"elinewidth": 1.2, "ecolor": "black"})
            ax.set_xticks(x, [r[0] for r in rows])
            for xi, r in zip(x, rows):
                label = fmt_seconds(r[1])
                if r[4] is not None and r[0] != "native":
                    label += f"\n{r[4]:.2f}×"
                ax.annotate(label, (xi, r[3]), xytext=(0, 4), textcoords="offset points",
                            ha="center", va="bottom", fontsize="small")
            ax.set_ylim(0, max(r[3] for r in rows) * 1.3 or 1)
            ax.set_ylabel("wall time (s)")
            runs = doc.get("n")
            t = "\n".join(textwrap.wrap(title, 30)) + (f"\n(median of {runs}, min-max)" if runs else "")
            if doc.get("ok") is False:
                ax.set_title(t + "\noutput DIFFERED from native", color=VERMILION, fontsize="medium")
            else:
                ax.set_title(t, fontsize="medium")
            ax.grid(axis="y", alpha=0.3)
        for ax in axes[len(entries):]:
            ax.set_visible(False)

    table_rows = []
    for title, doc in entries:
        for mode, med, lo, hi, s in _bench_rows(doc):
            table_rows.append([title, mode, fmt_seconds(med), fmt_seconds(lo), fmt_seconds(hi),
                               f"{s:.2f}×" if s is not None else "",
                               "" if doc.get("ok", True) else "output differed"])
    sections = [Section("Wall time: native vs legorun", draw, ncols=ncols, nrows=nrows,
                        height=3.8 * nrows, width=max(6.5, 3.2 * ncols),
                        table=(["benchmark", "mode", "median", "min", "max", "slowdown", "check"],
                               table_rows))]
    if n > 1:
        pairs = []  # (title, mode, median, min, max)
        for title, doc in entries:
            for mode, sd in (doc.get("slowdown") or {}).items():
                if isinstance(sd, dict) and "median" in sd:
                    pairs.append((title, mode, _num(sd["median"]), _num(sd.get("min", sd["median"])),
                                  _num(sd.get("max", sd["median"]))))
        if pairs:
            def draw_slow(axes):
                ax, = axes
                shown = pairs[::-1]
                y = list(range(len(shown)))
                modes = list(dict.fromkeys(p[1] for p in pairs if p[1] != "native"))
                colours = [_mode_colour(p[1], modes.index(p[1]) if p[1] in modes else 0) for p in shown]
                ax.barh(y, [p[2] for p in shown], color=colours,
                        xerr=[[max(0.0, p[2] - p[3]) for p in shown],
                              [max(0.0, p[4] - p[2]) for p in shown]], capsize=3)
                multi = len(modes) > 1
                ax.set_yticks(y, [f"{p[0]} ({p[1]})" if multi else p[0] for p in shown])
                ax.axvline(1.0, color="black", linewidth=1)
                ax.annotate("native", (1.0, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(3, -3), textcoords="offset points", va="top", fontsize="x-small")
                if max(p[4] for p in pairs) / max(min(p[3] for p in pairs), 1e-9) > 30:
                    ax.set_xscale("log")
                for yi, p in zip(y, shown):
                    ax.annotate(f"{p[2]:.2f}×", (p[4], yi), xytext=(4, 0),
                                textcoords="offset points", va="center", fontsize="x-small")
                ax.set_xlabel("slowdown against native (median, min-max)")
                ax.margins(x=0.15)
                ax.grid(axis="x", alpha=0.3)
            sections.append(Section("Slowdown by benchmark", draw_slow,
                                    height=_bar_height(len(pairs)), width=9.0))
    return sections


def bench_summary(entries: list) -> list:
    rows = [("benchmarks", str(len(entries)))]
    for title, doc in entries[:1] if len(entries) == 1 else []:
        rows.append(("command", " ".join(str(a) for a in doc.get("command") or [])))
        if doc.get("legorun_options"):
            rows.append(("legorun options", " ".join(doc["legorun_options"])))
        rows.append(("pairs", f"{doc.get('n', '?')} (after {doc.get('warmup', 0)} warm-up)"))
    bad = [t for t, d in entries if d.get("ok") is False]
    rows.append(("outputs", "differed from native in: " + ", ".join(bad) if bad
                 else "agree with native"))
    return rows


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def section_png(section: Section, dpi: int = 100) -> bytes:
    fig = _figure(section.width, section.height + 0.4)
    axes = fig.subplots(section.nrows, section.ncols, squeeze=False).flatten().tolist()
    section.draw(axes)
    fig.suptitle(section.title, fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def write_image(sections: list, path: str, title: str, fmt: str, summary: list = ()) -> None:
    width = max(s.width for s in sections)
    heights = [s.height + 0.4 for s in sections]
    line = "; ".join(f"{k} {v}" for k, v in summary)
    lines = textwrap.wrap(line, int(width * 11)) if line else []
    fig = _figure(width, sum(heights) + 0.5 + 0.2 * len(lines))
    subfigs = fig.subfigures(len(sections), 1, height_ratios=heights, squeeze=False).flatten()
    for sub, section in zip(subfigs, sections):
        axes = sub.subplots(section.nrows, section.ncols, squeeze=False).flatten().tolist()
        section.draw(axes)
        sub.suptitle(section.title, fontweight="bold")
    fig.suptitle("\n".join([title] + lines), fontsize="large")
    fig.savefig(path, format=fmt, dpi=100)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; }
details { margin: 0.5em 0; } .meta { color: #666; font-size: 0.9em; }
"""


def _html_table(header: list, rows: list) -> str:
    def cell(v, tag="td"):
        text = html.escape(str(v))
        num = isinstance(v, (int, float)) or (isinstance(v, str) and v[:1].isdigit())
        return f"<{tag}{' class=n' if num and tag == 'td' else ''}>{text}</{tag}>"
    out = ["<table>"]
    if any(header):
        out.append("<tr>" + "".join(cell(h, "th") for h in header) + "</tr>")
    out += ["<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows]
    out.append("</table>")
    return "\n".join(out)


def write_html(sections: list, path: str, title: str, summary: list, source: str) -> None:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">from {html.escape(source)}, drawn {html.escape(now)} by legorun report</p>',
             _html_table(["", ""], [[k, v] for k, v in summary]) if summary else ""]
    for s in sections:
        data = base64.b64encode(section_png(s)).decode("ascii")
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        parts.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
        if s.note:
            parts.append(f"<p>{html.escape(s.note)}</p>")
        if s.table and s.table[1]:
            parts.append("<details><summary>numbers</summary>")
            parts.append(_html_table(*s.table))
            parts.append("</details>")
    parts += ["</body>", "</html>", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


FORMATS = {".html": "html", ".htm": "html", ".png": "png", ".svg": "svg", ".pdf": "pdf"}


def build(doc: Any) -> tuple[str, list, list]:
    """(kind, sections, summary rows) for a loaded JSON document."""
    entries = bench_entries(doc)
    if entries:
        return "bench", bench_sections(entries), bench_summary(entries)
    if is_stats(doc):
        return "stats", stats_sections(doc), stats_summary(doc)
    raise ReportError("not a legorun stats JSON (--stats-json) nor a bench JSON (bench --json)")


def report(src: str, out: str | None = None, title: str | None = None) -> str:
    """Draw `src` into `out` (format from its extension); returns the path written."""
    try:
        with open(src, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise ReportError(f"cannot read {src}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{src} is not JSON: {e}") from None
    if out is None:
        out = os.path.splitext(src)[0] + ".html"
    fmt = FORMATS.get(os.path.splitext(out)[1].lower())
    if fmt is None:
        raise ReportError(f"{out}: unknown output format (use .html or .png; .svg and .pdf work too)")
    kind, sections, summary = build(doc)
    if title is None:
        title = ("legorun run: " if kind == "stats" else "legorun bench: ") + os.path.basename(src)
    try:
        if fmt == "html":
            write_html(sections, out, title, summary, src)
        else:
            write_image(sections, out, title, fmt, summary)
    except OSError as e:
        raise ReportError(f"cannot write {out}: {e.strerror}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legorun report", usage=USAGE,
        description="Draw a run's statistics (legorun --stats-json) or benchmark results "
                    "(legorun bench --json) as a self-contained HTML page or one PNG.")
    p.add_argument("file", metavar="FILE.json", help="stats JSON or bench JSON")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="OUT.html (default: FILE with .html) or OUT.png (also .svg, .pdf)")
    p.add_argument("--title", help="the report's title")
    return p


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        out = report(args.file, args.output, args.title)
    except ReportError as e:
        print(f"legorun report: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"legorun report: needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
        return 2
    print(f"legorun report: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
