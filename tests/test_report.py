"""The sweep's plots, inspected through matplotlib's object API: ticks at the realized token counts,
stock in the legend, model and n in the title, timing spread and its caveat; old cell files still plot."""

from matplotlib.container import ErrorbarContainer

from vtprune.eval import report, sweep

RUNS = {256: [20.0, 21.0, 26.0], 64: [14.0, 15.0, 17.0], 26: [12.0, 13.0, 13.5], 13: [11.0, 12.0, 12.5]}


def rows(with_runs=True, config=True):
    out = []
    for method, points in (("stock", [256]), ("random", [64, 26, 13]), ("fastervlm", [64, 26, 13])):
        for tokens in points:
            row = {"task": "vtprune_toy", "method": method, "keep": None if method == "stock" else tokens / 256,
                   "score": 0.5 + tokens / 1000, "n": 24, "metric": "accuracy", "visual_tokens_llm": float(tokens),
                   "prefill_ms": RUNS[tokens][1], "seconds": 1.0}
            if with_runs:
                row["prefill_ms_runs"] = RUNS[tokens]
            if config:
                row["config"] = {"model": "toy", "limit": 24}
            out.append(row)
    return out


def axes_of(records):
    figs = dict(report.figures(records))
    assert sorted(figs) == ["score_vtprune_toy.png", "time_vtprune_toy.png"]
    return figs["score_vtprune_toy.png"].axes[0], figs["time_vtprune_toy.png"].axes[0]


def caption(ax):
    return " ".join(t.get_text() for t in ax.texts)


def test_ticks_legend_title():
    for ax in axes_of(rows()):
        assert list(ax.get_xticks()) == [13, 26, 64, 256]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["13", "26", "64", "256"]
        assert len(ax.xaxis.get_minorticklocs()) == 0  # no 3×10^1 in between
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["stock", "random", "fastervlm"]
        assert ax.get_title() == "vtprune_toy: toy model, n = 24"


def test_timing_spread_and_caveat():
    score, timing = axes_of(rows())
    bars = [c for c in timing.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
    assert len(bars) == 3  # stock, random, fastervlm
    (segment,) = bars[0].lines[2][0].get_segments()  # stock: one bar from the fastest to the slowest repeat
    assert [y for _, y in segment] == [20.0, 26.0]
    assert timing.get_ylim()[0] == 0
    assert "median of 3 repeats" in caption(timing) and "compare within one run" in caption(timing)
    assert not score.containers and caption(score) == ""


def test_the_legend_covers_no_point_or_bar():
    """The legend sits beside the axes: its box and the axes' drawing area do not overlap (it once hid the
    stock error bar, drawn where matplotlib's "best" placed it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in dict(report.figures(rows())).values():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer, ax = canvas.get_renderer(), fig.axes[0]
        legend, area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= area.x1 and not legend.overlaps(area)
        assert fig.bbox.contains(legend.x1 - 1, legend.y0 + 1)  # and stays on the figure


def test_old_cells_without_repeats_or_config():
    score, timing = axes_of(rows(with_runs=False, config=False))
    assert not timing.containers  # one value per cell: no bars
    assert [line.get_ydata()[0] for line in timing.lines if line.get_label() == "stock"] == [21.0]
    assert "no repeats" in caption(timing) and "compare within one run" in caption(timing)
    assert score.get_title() == "vtprune_toy: n = 24"
    lmms = [{k: v for k, v in r.items() if not k.startswith("prefill")} for r in rows()]
    assert axes_of(lmms)[1].get_ylabel() == "seconds per sample"


def test_crowded_ticks_and_model_names():
    assert report._tick_labels([13.0, 26.0, 175.0, 179.3, 192.0, 256.0]) == ["13", "26", "175", "", "", "256"]
    assert report._model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert report._model_name("/models/llava-1.5-7b-hf/") == "llava-1.5-7b-hf"


def test_plots_write_pngs(tmp_path):
    written = report.plots(rows(), str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["score_vtprune_toy.png", "time_vtprune_toy.png"]
    assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in written)


def test_cell_record_keeps_every_repeat():
    class Runner:
        def run(self, cell, seed=None):
            times = [10.0, 11.0, 30.0] if seed == 0 else [12.0, 13.0, 14.0]
            return {"score": 0.5, "n": 4, "prefill_ms": times,
                    "totals": {"samples": 4, "visual_tokens_in": 1024, "visual_tokens_out": 256}}

    record = sweep._run_cell(Runner(), sweep.Cell("t", "random", 0.25), seeds=2)
    assert record["prefill_ms_runs"] == [10.0, 11.0, 30.0, 12.0, 13.0, 14.0]
    assert record["prefill_ms"] == 12.5  # the median of all repeats


def test_margin_columns_only_for_baselines_that_ran():
    """A sweep without ``downsample`` cells has no empty "Δ downsample" column; with one, it has."""
    records = report.add_margins(rows())
    head = report.markdown(records).splitlines()[2]
    assert "Δ random" in head and "Δ pool" in head and "Δ downsample" not in head
    fast = next(r for r in records if r["method"] == "fastervlm" and r["visual_tokens_llm"] == 26)
    line = next(line for line in report.markdown(records).splitlines() if line.startswith("| fastervlm | 0.1015625 |"))
    assert line.split(" | ")[4] == f"+{fast['score'] - 0.526:.3f}"  # its margin over random at 26 tokens
    down = dict(next(r for r in records if r["method"] == "random" and r["visual_tokens_llm"] == 26), method="downsample")
    head = report.markdown(report.add_margins(records + [down])).splitlines()[2]
    assert head.split(" | ")[4:7] == ["Δ random", "Δ pool", "Δ downsample"]


def test_every_method_has_its_own_line_style():
    """Twelve methods (a video sweep) on one plot: no two lines look alike (matplotlib cycles ten colours)."""
    records = []
    for i in range(12):
        records += [dict(row, method=f"m{i}") for row in rows() if row["method"] == "random"]
    acc, _ = axes_of(records + [r for r in rows() if r["method"] == "stock"])
    looks = [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in acc.get_lines()
             if line.get_label().startswith("m")]
    assert len(looks) == 12 and len(set(looks)) == 12
