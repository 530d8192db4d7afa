"""Charts people read: the eval chart has a chance line and a legend that covers no bar; the class
coverage chart keeps 65 class names readable (no overlapping labels)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")


def _summary(domains: list[str], methods: list[str]) -> dict:
    per = {d: {"mean": 30.0 + 10 * i, "err": 1.0} for i, d in enumerate(domains)}
    return {"datasets": {"OfficeHome": {"domains": domains, "methods": {
        m: {"per_domain": per, "avg": 42.0} for m in methods}}}}


def test_eval_chart_chance_line_and_legend_outside_the_bars(tmp_path):
    from dbr_builder.stages.evaluate.results import bar_chart, bar_figure

    summary = _summary(["Art", "Clipart", "Product", "Real World"], ["ours [direct]", "ours [reasoning]", "zero-shot"])
    paper = {"rows": [{"method": "RD-MLDG", "OfficeHome": 80.0}]}
    fig = bar_figure(summary, "OfficeHome", paper, num_classes=65)
    ax = fig.axes[0]
    chance = [ln for ln in ax.get_lines() if ln.get_label().startswith("chance")]
    assert len(chance) == 1 and abs(chance[0].get_ydata()[0] - 100 / 65) < 1e-9
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(r), ax.get_window_extent(r)
    assert legend.x0 >= axes.x1  # beside the plot: it cannot cover a bar
    assert "Real World" in [t.get_text().replace("\n", " ") for t in ax.get_xticklabels()]
    out = bar_chart(summary, "OfficeHome", tmp_path / "oh.png", paper, num_classes=65)
    assert out.read_bytes()[:4] == b"\x89PNG"
    # no class count: no chance line (unknown datasets)
    assert not [ln for ln in bar_figure(summary, "OfficeHome").axes[0].get_lines() if "chance" in ln.get_label()]


def test_65_class_labels_do_not_overlap():
    from dbr_builder.stages.filter.stats import class_figure

    classes = [{"class_name": f"Class_Name_{i:02d}", "coverage": (i % 10) / 10} for i in range(65)]
    fig = class_figure(classes)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(labels) == 65 and labels[0].get_text() == "Class Name 64"
    boxes = sorted((t.get_window_extent(r) for t in labels), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:], strict=False))  # no two labels overlap
    assert min(t.get_fontsize() for t in labels) >= 7
