"""Tables and plots of a sweep: ``results.json``, ``results.csv``, ``results.md``, PNGs.

Every row is measured at the number of visual tokens per sample the LLM actually saw, averaged
over its layers (``visual_tokens_llm`` from ``vtprune.stats(model)["totals"]``: the kept tokens
for a pre-LLM method, fewer for an in-LLM method that drops them part-way). A row's margin over a baseline
(``random``, ``pool``, ``downsample``) is taken against that baseline's cell of the same task whose
realized token count matches (within 2% or one token); the markdown table marks rows that do
not beat ``random``.
"""

from __future__ import annotations

import csv
import json
import os
import statistics

BASELINES = ("random", "pool", "downsample")
COLUMNS = ("task", "method", "keep", "runs", "n", "metric", "score", "visual_tokens_in", "visual_tokens_out",
           "visual_tokens_llm",
           "llm_flops_saved", "prefill_ms", "seconds", "delta_random", "delta_pool", "delta_downsample")


def _matched(row, candidates):
    tokens = row["visual_tokens_llm"]
    for other in candidates:
        if abs(other["visual_tokens_llm"] - tokens) <= max(1.0, 0.02 * tokens):
            return other
    return None


def add_margins(records):
    """Set ``delta_<baseline>`` on every non-stock row with a token-matched baseline cell."""
    for row in records:
        for base in BASELINES:
            row[f"delta_{base}"] = None
            if row["method"] in ("stock", base) or row.get("score") is None:
                continue
            pool = [r for r in records if r["task"] == row["task"] and r["method"] == base
                    and r.get("score") is not None]
            match = _matched(row, pool)
            if match is not None:
                row[f"delta_{base}"] = row["score"] - match["score"]
    return records


def write_all(records, out):
    add_margins(records)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    types = sorted({t for r in records for t in r.get("by_type", {})})
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(COLUMNS) + types)
        for r in records:
            writer.writerow([_csv(r.get(c)) for c in COLUMNS] + [_csv(r.get("by_type", {}).get(t)) for t in types])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(records))
    return plots(records, out)


def _csv(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _fmt(value, spec=".3f", signed=False):
    if value is None:
        return "–"
    return format(value, ("+" if signed else "") + spec)


def markdown(records) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in records):
        failed = [r for r in records if r["task"] == task and r.get("score") is None]
        rows = [r for r in records if r["task"] == task and r.get("score") is not None]
        if not rows:
            lines += [f"## {task}", ""] + [f"Not applicable: `{r['method']}` keep={r['keep']}: {r.get('error')}"
                                          for r in failed] + [""]
            continue
        types = sorted({t for r in rows for t in r.get("by_type", {})})
        timing = any("prefill_ms" in r for r in rows)
        metric = rows[0].get("metric", "score")
        lines += [f"## {task} ({metric}, n = {rows[0].get('n')})", ""]
        margins = [b for b in BASELINES if b != "downsample" or any(r.get("delta_downsample") is not None for r in rows)]
        head = ["method", "keep", "visual tokens", metric] + [f"Δ {b}" for b in margins] + types
        head += ["prefill ms/sample" if timing else "s/sample", "LLM FLOPs saved"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            flag = " ✗" if r.get("delta_random") is not None and r["delta_random"] <= 0 else ""
            cells = [r["method"], "–" if r["keep"] is None else str(r["keep"]), f"{r['visual_tokens_llm']:.1f}",
                     _fmt(r["score"]) + flag] + [_fmt(r.get(f"delta_{b}"), signed=True) for b in margins]
            cells += [_fmt(r.get("by_type", {}).get(t)) for t in types]
            speed = r.get("prefill_ms") if timing else (r["seconds"] / r["n"] if r.get("n") else None)
            cells += [_fmt(speed, ".2f"), f"{r.get('llm_flops_saved', 0.0):.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "✗: not above `random` at the same number of visual tokens.", ""]
        lines += [f"Not applicable: `{r['method']}` keep={r['keep']}: {r.get('error')}" for r in failed]
        lines += [""] if failed else []
    return "\n".join(lines)


def plots(records, out) -> list:
    """``score_<task>.png`` and ``time_<task>.png``: per method, against visual tokens seen by the LLM."""
    written = []
    for name, fig in figures(records):
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def figures(records) -> list:
    """``[(file name, matplotlib Figure)]``: a score and a time figure per task."""
    # no pyplot: leaves the caller's backend (e.g. a notebook's) alone
    from matplotlib.figure import Figure

    out = []
    for task in dict.fromkeys(r["task"] for r in records):
        for kind in ("score", "time"):
            fig = Figure(figsize=(8.2, 4.4))
            draw(fig.add_subplot(), [r for r in records if r["task"] == task], kind)
            fig.tight_layout()
            out.append((f"{kind}_{task}.png", fig))
    return out


def draw(ax, records, kind="score"):
    """One task's ``score`` (or ``time``) per method on ``ax``, against the realized visual tokens
    (log axis, ticks at the counts the cells realized); stock is a star and a dashed level; the
    timing of a cell is the median of its repeats with min-max bars and a caveat on timing noise."""
    from matplotlib.ticker import NullLocator

    rows = [r for r in records if r.get("score") is not None and r.get("visual_tokens_llm")]
    timing = any("prefill_ms" in r for r in rows)
    others = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "stock"]
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["visual_tokens_llm"], _y(r, kind, timing), _runs(r, kind, timing))
                        for r in rows if r["method"] == method)
        points = [p for p in points if p[1] is not None]
        if not points:
            continue
        xs, ys, runs = zip(*points)
        style = {"color": "black", "marker": "*", "markersize": 11, "linestyle": "none"} if method == "stock" \
            else _style(others.index(method))
        if kind == "time" and any(runs):
            spread = [[y - min(r or [y]) for y, r in zip(ys, runs)], [max(r or [y]) - y for y, r in zip(ys, runs)]]
            ax.errorbar(xs, ys, yerr=spread, capsize=2.5, elinewidth=0.9, label=method, **style)
        else:
            ax.plot(xs, ys, label=method, **style)
        if method == "stock":
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, zorder=0)
    ax.set_xscale("log")
    ticks = sorted({round(r["visual_tokens_llm"], 1) for r in rows})
    ax.set_xticks(ticks, _tick_labels(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("visual tokens per sample seen by the LLM (mean over layers)")
    ax.set_ylabel(_metric(rows) if kind == "score" else ("prefill ms per sample" if timing else "seconds per sample"))
    ax.set_title(title(rows), fontsize=10)
    ax.grid(alpha=0.3)
    # beside the axes, never over a point or an error bar (stock's sits at the right, where "best" put it)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    if kind == "time":
        ax.set_ylim(bottom=0)
        ax.annotate(caveat(rows, timing), xy=(0, 0), xycoords="axes fraction", xytext=(0, -32),
                    textcoords="offset points", ha="left", va="top", fontsize=7, color="dimgray")
    return ax


def _style(i: int) -> dict:
    """The i-th method's line: ten colours, then the same colours with another marker and dash."""
    return {"color": f"C{i % 10}", "marker": "osD^"[i // 10 % 4], "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}


def title(rows) -> str:
    """``"vtprune_toy: toy model, n = 400"`` (the model from the cells' ``config`` when they have one)."""
    if not rows:
        return ""
    models = {str((r.get("config") or {}).get("model")) for r in rows if (r.get("config") or {}).get("model")}
    model = ", ".join(sorted(_model_name(m) for m in models))
    ns = sorted({r["n"] for r in rows if r.get("n") is not None})
    n = "" if not ns else f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
    details = ", ".join(p for p in (model, n) if p)
    return f"{rows[0]['task']}: {details}" if details else rows[0]["task"]


def caveat(rows, timing) -> str:
    spreads = [(max(r["prefill_ms_runs"]) - min(r["prefill_ms_runs"])) / 2 / r["prefill_ms"]
               for r in rows if timing and r.get("prefill_ms_runs") and r.get("prefill_ms")]
    if spreads:
        repeats = statistics.mode(len(r["prefill_ms_runs"]) for r in rows if r.get("prefill_ms_runs"))
        return (f"median of {repeats} repeats, bars min–max (typically ±{statistics.median(spreads):.0%}); "
                "CPU timings are noisy: compare within one run only")
    return "one timing per cell, no repeats: CPU timings vary ±10% or more; compare within one run only"


def _tick_labels(ticks):
    """The realized counts as plain numbers; a tick within 12% of the last labelled one stays unlabelled."""
    labels, last = [], None
    for t in ticks:
        crowded = last is not None and t < last * 1.12
        labels.append("" if crowded else (f"{t:.0f}" if abs(t - round(t)) < 0.05 else f"{t:.1f}"))
        last = last if crowded else t
    return labels


def _model_name(model):
    if model in ("toy", "toy-video"):
        return {"toy": "toy model", "toy-video": "toy video model"}[model]
    return os.path.basename(model.rstrip("/")) if os.path.isdir(model) or model.startswith(("/", ".")) else model


def _metric(rows):
    return rows[0].get("metric", "score") if rows else "score"


def _y(row, kind, timing):
    if kind == "score":
        return row["score"]
    if timing:
        return row.get("prefill_ms")
    return row["seconds"] / row["n"] if row.get("n") else None


def _runs(row, kind, timing):
    return tuple(row.get("prefill_ms_runs") or ()) if kind == "time" and timing else ()
