"""PNG figures for the eval commands. matplotlib is imported here only, lazily, with the Agg backend."""
from __future__ import annotations

from pathlib import Path


def _plt():
    try:
        import matplotlib
    except ImportError:
        from ..errors import SinkstreamError
        raise SinkstreamError("plots need matplotlib: pip install 'sinkstream[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ppl_curves(path: Path, curves: list[dict], *, title: str = "") -> None:
    """log-PPL (mean NLL per block of tokens) against stream position, one line per cache."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(dict.fromkeys((c["label"], c["mode"]) for c in curves))
    for label, mode in labels:
        pts = [c for c in curves if c["label"] == label and c["mode"] == mode]
        name = label if len({m for _, m in labels}) == 1 else f"{label} [{mode}]"
        ax.plot([p["tokens"] for p in pts], [p["nll"] for p in pts], label=name, lw=1.2)
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("log perplexity (mean NLL per block)")
    ax.set_title(title)
    _save(plt, fig, [ax], path)


def bench_plot(path: Path, rows: list[dict]) -> None:
    """Decode ms/token and process RSS against stream position (log x), one line per cache."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = [r for r in rows if r["label"] == label and r.get("ms_per_token") is not None]
        if not pts:
            continue
        x = [r["position"] for r in pts]
        a.plot(x, [r["ms_per_token"] for r in pts], marker="o", label=label)
        b.plot(x, [r["rss_mib"] for r in pts], marker="o", label=label)
    for ax, ylabel in ((a, "decode ms / token"), (b, "process RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("stream position (tokens)")
        ax.set_ylabel(ylabel)
    a.set_ylim(bottom=0)
    _save(plt, fig, [a, b], path)


def sink_heatmap(path: Path, mass, *, title: str, epsilon: float) -> None:
    """mass: [layers, heads] first-token attention mass."""
    plt = _plt()
    layers, heads = mass.shape
    fig, ax = plt.subplots(figsize=(max(4, heads * 0.5 + 2), max(4, layers * 0.22 + 1.5)))
    im = ax.imshow(mass, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="upper")
    for li in range(layers):
        for hi in range(heads):
            if mass[li, hi] > epsilon:
                ax.plot(hi, li, marker=".", color="white", ms=3)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="attention mass on the first token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recall_plot(path: Path, rows: list[dict], *, x: str, xlabel: str, title: str, window_marks=()) -> None:
    """Accuracy against distance (tokens or lines back), one line per cache; dashed lines at cache sizes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r[x], r["accuracy"]) for r in rows if r["label"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for w in window_marks:
        ax.axvline(w, ls="--", color="gray", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    _save(plt, fig, [ax], path)


def chat_plot(path: Path, rows: list[dict]) -> None:
    """Reply length (tokens) per turn, one line per cache; crosses mark degenerate replies."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = [r for r in rows if r["label"] == label]
        line, = ax.plot([r["turn"] for r in pts], [r["reply_tokens"] for r in pts], lw=1, label=label)
        bad = [r for r in pts if r["degenerate"]]
        ax.scatter([r["turn"] for r in bad], [r["reply_tokens"] for r in bad], marker="x", color=line.get_color())
    ax.set_xlabel("turn (one endless session)")
    ax.set_ylabel("reply tokens")
    _save(plt, fig, [ax], path)


def _save(plt, fig, axes, path: Path) -> None:
    """The common finish: light grid, small legend, tight layout, PNG at 120 dpi, figure closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
