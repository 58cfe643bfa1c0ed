"""`fleet run --plot FILE`: latency over time and the latency histogram.

`.html` is a self-contained page with inline SVG (no extra dependency); `.png` uses
matplotlib when it is installed (`pip install matplotlib`).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from device_sim.common.errors import UserError
from device_sim.device import registration as reg
from device_sim.fleet.report import DeviceResult

WIDTH, HEIGHT, PAD = 760, 300, 50
COLOURS = {reg.ASSIGNED: "#2a7", reg.DISABLED: "#c80", reg.FAILED: "#c33", reg.UNAUTHORIZED: "#a3a"}
OTHER_COLOUR = "#555"


def check_format(path: Path) -> str:
    """"html" or "png" by the file name; UserError otherwise (checked before a run starts)."""
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        return "html"
    if suffix == ".png":
        return "png"
    raise UserError(f"--plot {path}: unknown format; name the file .html or .png")


def write_plot(path: Path, devices: list[DeviceResult], title: str) -> None:
    text = render_html(devices, title) if check_format(path) == "html" else None
    tmp = path.with_name(path.name + ".tmp")
    if text is not None:
        tmp.write_text(text, encoding="utf-8")
    else:
        _write_png(tmp, devices, title)
    tmp.replace(path)  # never leave a half-written plot behind


def _points(devices: list[DeviceResult]) -> list[tuple[float, float, str]]:
    return [(d.started_s, d.total_ms, d.status) for d in devices if d.total_ms is not None]


def histogram(values: list[float], bins: int = 40) -> tuple[list[int], float, float]:
    """Counts per bin over [0, max]; returns (counts, bin_width, max)."""
    top = max(values) if values else 1.0
    width = top / bins if top > 0 else 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v / width))] += 1
    return counts, width, top


def render_html(devices: list[DeviceResult], title: str) -> str:
    points = _points(devices)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}svg{border:1px solid #ccc;margin-bottom:2em}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        "<h2>Total latency over time</h2>" + _scatter_svg(points)
        + "<h2>Total latency histogram</h2>" + _histogram_svg([p[1] for p in points])
        + _legend() + "</body></html>"
    )


def _legend() -> str:
    items = "".join(
        f"<span style='color:{c};margin-right:1em'>&#9679; {html.escape(s)}</span>" for s, c in COLOURS.items()
    )
    return f"<p>{items}<span style='color:{OTHER_COLOUR}'>&#9679; other</span></p>"


def _axes(x_label: str, y_label: str, x_max: float, y_max: float) -> str:
    x0, y0, x1, y1 = PAD, HEIGHT - PAD, WIDTH - 10, 10
    parts = [
        f"<line x1='{x0}' y1='{y0}' x2='{x1}' y2='{y0}' stroke='#000'/>",
        f"<line x1='{x0}' y1='{y0}' x2='{x0}' y2='{y1}' stroke='#000'/>",
        f"<text x='{(x0 + x1) / 2}' y='{HEIGHT - 10}' text-anchor='middle'>{html.escape(x_label)}</text>",
        f"<text x='12' y='{(y0 + y1) / 2}' transform='rotate(-90 12 {(y0 + y1) / 2})' "
        f"text-anchor='middle'>{html.escape(y_label)}</text>",
    ]
    for i in range(5):
        fx, fy = i / 4, i / 4
        parts.append(f"<text x='{x0 + fx * (x1 - x0)}' y='{y0 + 15}' font-size='11' "
                     f"text-anchor='middle'>{_fmt(fx * x_max)}</text>")
        parts.append(f"<text x='{x0 - 4}' y='{y0 - fy * (y0 - y1) + 4}' font-size='11' "
                     f"text-anchor='end'>{_fmt(fy * y_max)}</text>")
    return "".join(parts)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _scatter_svg(points: list[tuple[float, float, str]]) -> str:
    x_max = max((p[0] for p in points), default=1.0) or 1.0
    y_max = max((p[1] for p in points), default=1.0) or 1.0
    sx = (WIDTH - 10 - PAD) / x_max
    sy = (HEIGHT - PAD - 10) / y_max
    dots = "".join(
        f"<circle cx='{PAD + x * sx:.1f}' cy='{HEIGHT - PAD - y * sy:.1f}' r='1.6' "
        f"fill='{COLOURS.get(status, OTHER_COLOUR)}'/>"
        for x, y, status in points
    )
    return (f"<svg width='{WIDTH}' height='{HEIGHT}'>"
            + _axes("start time (s)", "total latency (ms)", x_max, y_max) + dots + "</svg>")


def _histogram_svg(values: list[float]) -> str:
    counts, width, top = histogram(values)
    c_max = max(counts) or 1
    bar_w = (WIDTH - 10 - PAD) / len(counts)
    sy = (HEIGHT - PAD - 10) / c_max
    bars = "".join(
        f"<rect x='{PAD + i * bar_w:.1f}' y='{HEIGHT - PAD - c * sy:.1f}' width='{max(bar_w - 1, 1):.1f}' "
        f"height='{c * sy:.1f}' fill='#37a'/>"
        for i, c in enumerate(counts) if c
    )
    return (f"<svg width='{WIDTH}' height='{HEIGHT}'>"
            + _axes("total latency (ms)", "devices", top if not math.isnan(top) else 1, c_max) + bars + "</svg>")


def _write_png(path: Path, devices: list[DeviceResult], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot *.png needs matplotlib (pip install matplotlib); or name the file .html") from None
    points = _points(devices)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    fig.suptitle(title)
    for status in sorted({p[2] for p in points}):
        xs = [p[0] for p in points if p[2] == status]
        ys = [p[1] for p in points if p[2] == status]
        top.scatter(xs, ys, s=4, label=status, color=COLOURS.get(status, OTHER_COLOUR))
    top.set_xlabel("start time (s)")
    top.set_ylabel("total latency (ms)")
    top.legend()
    bottom.hist([p[1] for p in points], bins=40, color="#37a")
    bottom.set_xlabel("total latency (ms)")
    bottom.set_ylabel("devices")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
