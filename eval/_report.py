"""The comparison report: ``report.md`` with PNGs beside it, and a self-contained ``report.html``.

The report holds the summary table (fairness per prompt role with the interval of the seen mean,
fidelity, Fréchet distance, cost), per-concept tables of judged shares and deviations, a bar chart per
concept of each method's attribute shares against the target, a fairness-vs-quality-vs-cost plot, and
an image grid per method (the same seeds in every grid, so cells compare across methods). Figures are
drawn on matplotlib ``Figure`` objects (Agg), never through pyplot, so no global backend is touched.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fairtune.data import atomic_write_text, format_number, image_grid

NA = "n/a"


# ============================================================================================ tables
def _ci(summary: Mapping) -> str:
    ci = summary.get("mean_dev_seen_ci")
    if summary.get("mean_dev_seen") is None:
        return NA
    if not ci:
        return format_number(summary["mean_dev_seen"])
    return f"{format_number(summary['mean_dev_seen'])} [{format_number(ci[0])}, {format_number(ci[1])}]"


SUMMARY_HEADER = [
    "method",
    "kind",
    "mean dev seen [95% CI]",
    "worst dev seen",
    "mean dev named",
    "mean dev held-out",
    "mean dev paraphrase",
    "explicit kept",
    "fidelity",
    "Fréchet",
    "UNet evals/img",
    "s/img",
    "follows drawn class",
    "undetermined",
]


def summary_rows(metrics: Mapping) -> list[list[str]]:
    """One row per method, in the columns of :data:`SUMMARY_HEADER`."""
    rows = []
    for name, m in metrics["methods"].items():
        if m.get("failed"):
            rows.append([name, m["kind"], f"failed: {m.get('error', '')}"] + [NA] * (len(SUMMARY_HEADER) - 3))
            continue
        s = m["summary"]
        evals, formula = s["unet_evals_per_image"], s.get("unet_evals_per_image_formula")
        evals_txt = NA if evals is None else f"{evals:g}"
        if evals is not None and formula is not None and abs(evals - formula) > 1e-9:
            evals_txt += f" (formula {formula:g})"
        rows.append(
            [
                name,
                m["kind"],
                _ci(s),
                format_number(s["worst_dev_seen"]),
                format_number(s.get("mean_dev_named")),
                format_number(s["mean_dev_heldout"]),
                format_number(s["mean_dev_paraphrase"]),
                format_number(s.get("explicit_kept")),
                format_number(s["fidelity"]),
                format_number(s["frechet"], 2),
                evals_txt,
                format_number(s["sec_per_image"], 4),
                format_number(s.get("follows_drawn_class")),
                str(s["undetermined"]),
            ]
        )
    return rows


MEASUREMENT_HEADER = [
    "method",
    "corrected mean dev seen",
    "corrected mean dev held-out",
    "judges' agreement",
    "Cohen's kappa",
    "change vs base [95% CI]",
    "undetermined rate",
]


def measurement_rows(metrics: Mapping) -> list[list[str]]:
    """Per method: judge-corrected deviations, two-judge agreement, same-seed change score and the
    undetermined rate; empty when the comparison measured none of them."""
    keys = ("mean_dev_corrected_seen", "agreement", "change_score")
    if not any(m["summary"].get(k) is not None for m in metrics["methods"].values() for k in keys):
        return []
    rows = []
    for name, m in metrics["methods"].items():
        s = m["summary"]
        ci = s.get("change_score_ci")
        change = format_number(s.get("change_score")) + (
            f" [{format_number(ci[0])}, {format_number(ci[1])}]" if ci else ""
        )
        rows.append(
            [
                name,
                format_number(s.get("mean_dev_corrected_seen")),
                format_number(s.get("mean_dev_corrected_heldout")),
                format_number(s.get("agreement")),
                format_number(s.get("kappa")),
                change,
                format_number(s.get("undetermined_rate")),
            ]
        )
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def summary_markdown(metrics: Mapping) -> str:
    """The summary table as markdown (what ``fairtune compare`` prints)."""
    return markdown_table(SUMMARY_HEADER, summary_rows(metrics))


def _share_cell(p: Sequence[float | None], classes: Sequence[str]) -> str:
    if not p or any(v is None for v in p):
        return NA
    if len(classes) == 2:
        return format_number(p[0], 2)
    return " / ".join(f"{c} {format_number(v, 2)}" for c, v in zip(classes, p))


def concept_tables(metrics: Mapping) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Per prompt and method: judged shares (first class for two classes) and deviation [95% CI]."""
    classes = metrics["classes"]
    names = list(metrics["methods"])
    share_header = ["prompt", "role", "target", *names]
    dev_header = ["prompt", "role", *names]
    share_rows, dev_rows = [], []
    for e in metrics["prompts"]:
        key = e["key"]
        first = next(iter(metrics["methods"].values()))["per_concept"][key]
        share_rows.append(
            [key, e["role"], _share_cell(first["target"], classes)]
            + [_share_cell(metrics["methods"][n]["per_concept"][key]["p_hat"], classes) for n in names]
        )
        cells = []
        for n in names:
            r = metrics["methods"][n]["per_concept"][key]
            ci = r.get("dev_ci") or [None, None]
            cells.append(f"{format_number(r['dev'])} [{format_number(ci[0])}, {format_number(ci[1])}]")
        dev_rows.append([key, e["role"], *cells])
    return share_header, share_rows, dev_header, dev_rows


# =========================================================================================== figures
def _class_colors(classes: Sequence[str]) -> list:
    import matplotlib.colors as mcolors
    from matplotlib import colormaps

    tab = colormaps["tab10"]
    return [c if mcolors.is_color_like(c) else tab(i % 10) for i, c in enumerate(classes)]


def plot_shares(metrics: Mapping, path: Path) -> Path:
    """One panel per prompt: each method's judged class shares stacked, the target as dashed lines."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    classes = metrics["classes"]
    names = list(metrics["methods"])
    prompts = metrics["prompts"]
    colors = _class_colors(classes)
    ncols = min(5, len(prompts))
    nrows = math.ceil(len(prompts) / ncols)
    w = max(2.6, 0.45 * len(names) + 0.9)
    fig = Figure(figsize=(w * ncols, 2.6 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    x = np.arange(len(names))
    for ax, e in zip(axes.flat, prompts):
        bottom = np.zeros(len(names))
        for k, cls in enumerate(classes):
            p = np.array(
                [
                    np.nan_to_num(float(metrics["methods"][n]["per_concept"][e["key"]]["p_hat"][k] or 0.0))
                    for n in names
                ]
            )
            ax.bar(
                x, p, bottom=bottom, color=colors[k], alpha=0.8, label=cls, edgecolor="white", linewidth=0.5
            )
            bottom += p
        target = metrics["methods"][names[0]]["per_concept"][e["key"]]["target"]
        for b in np.cumsum(target)[:-1]:
            ax.axhline(b, color="black", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{e['key']} ({e['role']})", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(prompts) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", linestyle="--"))
    labels.append("target")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(labels),
        fontsize=8,
        frameon=False,
        title=f"judged {metrics['attribute']} shares per prompt (stacked) against the target",
        title_fontsize=9,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_tradeoff(metrics: Mapping, path: Path) -> Path:
    """Mean deviation on seen prompts (with its interval) against cost (seconds and UNet evaluations
    per image); marker colour is the Fréchet distance (grey where there is none)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    names = list(metrics["methods"])
    s = [metrics["methods"][n]["summary"] for n in names]
    y = np.array([np.nan if v["mean_dev_seen"] is None else v["mean_dev_seen"] for v in s], float)
    lo = np.array([(v["mean_dev_seen_ci"] or [np.nan, np.nan])[0] for v in s], float)
    hi = np.array([(v["mean_dev_seen_ci"] or [np.nan, np.nan])[1] for v in s], float)
    fr = np.array([np.nan if v["frechet"] is None else v["frechet"] for v in s], float)
    cmap = colormaps["viridis"]
    has_fr = np.isfinite(fr).any()
    norm = None
    if has_fr:
        f_lo, f_hi = float(np.nanmin(fr)), float(np.nanmax(fr))
        norm = Normalize(f_lo, f_hi if f_hi > f_lo else f_lo + 1.0)
    colors = [cmap(norm(f)) if np.isfinite(f) else (0.6, 0.6, 0.6, 1.0) for f in fr]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    xs = [
        ("seconds per image", np.array([v["sec_per_image"] for v in s], float)),
        ("UNet evaluations per image", np.array([v["unet_evals_per_image"] for v in s], float)),
    ]
    for ax, (label, x) in zip(axes, xs):
        err = np.vstack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor="0.5", elinewidth=1, capsize=3, zorder=1)
        ax.scatter(x, y, c=colors, s=90, edgecolors="black", zorder=2)
        for xi, yi, n in zip(x, y, names):
            if np.isfinite(yi):
                ax.annotate(n, (xi, yi), textcoords="offset points", xytext=(6, 5), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if np.all(np.isfinite(x)) and x.size and x.max() > x.min():
            pad = 0.15 * (x.max() - x.min())
            ax.set_xlim(max(0, x.min() - pad), x.max() + 2 * pad)
    axes[0].set_ylabel("mean deviation, seen prompts (lower is fairer)")
    if has_fr:
        sm = ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=axes, label="Fréchet distance (lower is closer to real images)")
    fig.suptitle("fairness vs quality vs cost", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def prompt_grid(images: torch.Tensor, *, n_prompts: int, n_per_prompt: int, columns: int) -> np.ndarray:
    """``(rows * H + pad, columns * W + pad, 3)`` uint8: row r holds the first ``columns`` images of
    prompt r (``images`` prompt-major, ``n_per_prompt`` each), separated by one white pixel."""
    cols = min(columns, n_per_prompt)
    first = [r * n_per_prompt + c for r in range(n_prompts) for c in range(cols)]
    return image_grid(images[first], cols, rows=n_prompts, gap=1)


def plot_grid(images: torch.Tensor, metrics: Mapping, name: str, path: Path, *, columns: int) -> Path:
    """A method's image grid: one row per prompt (labelled), the first ``columns`` seeds."""
    from matplotlib.figure import Figure

    prompts = metrics["prompts"]
    n = metrics["generation"]["n_per_prompt"]
    grid = prompt_grid(images, n_prompts=len(prompts), n_per_prompt=n, columns=columns)
    cols = min(columns, n)
    cell = 0.42
    fig = Figure(figsize=(cols * cell + 2.2, len(prompts) * cell + 0.6))
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    h = (grid.shape[0] - 1) / len(prompts)
    ax.set_yticks([h * (r + 0.5) for r in range(len(prompts))], [p["key"] for p in prompts], fontsize=7)
    w = (grid.shape[1] - 1) / cols
    seed = metrics["generation"]["seed"]
    ax.set_xticks([w * (c + 0.5) for c in range(cols)], [str(seed + c) for c in range(cols)], fontsize=6)
    ax.set_xlabel("seed", fontsize=7)
    ax.tick_params(length=0)
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.set_title(f"{name} ({metrics['methods'][name]['kind']})", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ============================================================================================ render
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "method"


def _blocks(metrics: Mapping, figures: Mapping[str, str], grids: Mapping[str, str]) -> list[tuple]:
    gen = metrics["generation"]
    classes = metrics["classes"]
    t = metrics["target"]
    target_txt = ", ".join(f"{c} {v:.2f}" for c, v in zip(classes, t["default"]))
    if t.get("per_concept"):
        target_txt += f" (per-concept overrides: {', '.join(t['per_concept'])})"
    bb = metrics.get("backbone") or {}
    q = np.asarray(t["default"], float)
    floor = float(np.sqrt(q * (1 - q) / gen["n_per_prompt"]).max())
    share_h, share_r, dev_h, dev_r = concept_tables(metrics)
    summaries = [m["summary"] for m in metrics["methods"].values()]
    if any(v.get("fidelity") is not None for v in summaries):
        fid_txt = "Fidelity: share of images the concept judge recognises as the prompted concept."
    else:
        fid_txt = "Fidelity: n/a (no concept judge)."
    if any(v.get("frechet") is not None for v in summaries):
        fr_txt = (
            "Fréchet: distance between judge features of the images of roles "
            f"{', '.join(metrics.get('frechet_roles', []))} and real images."
        )
    else:
        fr_txt = "Fréchet: n/a (no reference images, or no judge with features)."
    first = classes[0] if len(classes) == 2 else None
    blocks: list[tuple] = [
        ("h1", metrics.get("title", "fairtune compare")),
        (
            "p",
            f"Backbone `{bb.get('kind', '?')}` `{bb.get('pretrained')}` ({metrics['image_size']}px). "
            f"{gen['n_per_prompt']} images per prompt, image i of every prompt from seed {gen['seed']}+i, "
            f"{gen['steps']} DDIM steps, guidance {gen['guidance_scale']}, batch size {gen['batch_size']} "
            "(every method timed in this run with the same batch size).",
        ),
        ("p", f"Judges: {metrics['judges']}. Target over `{metrics['attribute']}`: {target_txt}."),
        ("h2", "Summary"),
        ("table", SUMMARY_HEADER, summary_rows(metrics)),
        (
            "p",
            "dev = max over classes of |judged share − target| per prompt; mean/worst over the prompts of "
            "each role (seen: neutral prompts of concepts the adapters trained on; named: concepts their "
            "training named without images; held-out: concepts they never saw; paraphrase: wordings they "
            "never saw). Explicit kept: share of the images of prompts that name a class judged in that "
            "class. Intervals (95%) come from exact "
            "intervals on the judged shares; the seen mean's holds for all its prompts at once "
            "(docs/metrics.md). "
            f"Sampling-noise floor of one prompt's share: √(q(1−q)/N) ≤ {floor:.3f}. {fid_txt} {fr_txt} "
            "UNet evals/img is counted by a hook on the UNet; s/img is wall time of generation. Follows "
            "drawn class (inference-time baselines): share of placed images judged as the class drawn "
            "for them from the target.",
        ),
        *_measurement_blocks(metrics),
        ("h2", "Shares per prompt"),
        (
            "p",
            f"Judged share of `{first}`." if first else "Judged shares per class.",
        ),
        ("table", share_h, share_r),
        ("img", figures["shares"], "judged shares per prompt"),
        ("h2", "Deviation per prompt [95% CI]"),
        ("table", dev_h, dev_r),
        ("h2", "Fairness vs quality vs cost"),
        ("img", figures["tradeoff"], "fairness vs quality vs cost"),
        ("h2", "Samples"),
        ("p", "Rows: prompts; columns: seeds (the same in every grid)."),
    ]
    for name, fname in grids.items():
        blocks += [("h3", name), ("img", fname, f"samples of {name}", "grid")]
    return blocks


def _measurement_blocks(metrics: Mapping) -> list[tuple]:
    rows = measurement_rows(metrics)
    if not rows:
        return []
    meas = metrics.get("measurement") or {}
    cal = meas.get("calibration")
    if cal:
        cal_txt = (
            f"{cal['n']} labelled held-out images "
            f"(judge accuracy there {format_number(cal['accuracy_first'])}"
        )
        if cal.get("accuracy_second") is not None:
            cal_txt += f", second judge {format_number(cal['accuracy_second'])}"
        cal_txt += "); "
        if cal.get("informative_first") is False:
            cal_txt += (
                f"**the judge is not informative**: its balanced accuracy there is "
                f"{format_number(cal.get('balanced_accuracy_first'))}, near chance, "
                "so the corrected shares span what "
                "the data allow (up to [0, 1]) and its judged shares say little about the true mix; "
            )
    else:
        cal_txt = "a calibration set: none given (n/a); "
    second = meas.get("second_judge")
    text = (
        "Corrected: the judged shares corrected for the judge's own error, by its confusion matrix on "
        + cal_txt
        + "dev recomputed from the corrected shares, mean over prompts of the role. Agreement: share of "
        "images both judges placed on which they agree, and Cohen's kappa"
        + (f" (second judge: {second})" if second else " (no second judge: n/a)")
        + (
            ". Change vs base: mean cosine distance between the embeddings of each image and the "
            f"`{meas['change_base']}` image from the same seed and prompt (0 = unchanged)."
            if meas.get("change_base")
            else ". Change vs base: n/a (no base method in this run to compare images with)."
        )
    )
    return [("h2", "Measurement: judge error, agreement, change"), ("table", MEASUREMENT_HEADER, rows),
            ("p", text)]  # fmt: skip


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def render_markdown(blocks: Sequence[tuple]) -> str:
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            out.append("#" * int(b[0][1]) + " " + b[1])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            out.append(markdown_table(b[1], b[2]))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: Sequence[tuple], folder: Path) -> str:
    """HTML with every image embedded as base64 (no external reference)."""
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            body.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{_inline_html(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode((folder / b[1]).read_bytes()).decode("ascii")
            cls = f' class="{b[3]}"' if len(b) > 3 else ""
            src = f"data:image/png;base64,{data}"
            body.append(f'<figure><img{cls} alt="{html.escape(b[2])}" src="{src}"></figure>')
    title = html.escape(next((b[1] for b in blocks if b[0] == "h1"), "report"))
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}img.grid{image-rendering:pixelated}code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    metrics: Mapping,
    images_by_method: Mapping[str, torch.Tensor],
    out: str | Path,
    *,
    grid_columns: int = 8,
) -> dict[str, Path]:
    """Write ``report.md`` (with ``shares.png``, ``tradeoff.png``, ``grid_<method>.png`` beside it)
    and a self-contained ``report.html`` (the same content, images embedded as base64).

    Args:
        metrics: What :func:`~fairtune.eval.run_comparison` returns (or ``metrics.json`` holds).
        images_by_method: Per method, its images in prompt-major order (``n_per_prompt`` per prompt).
        out: Output folder.
        grid_columns: Images per prompt in each grid.

    Returns:
        The paths written, by name (``report.md``, ``report.html``, ``shares``, ``tradeoff``, grids).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failed = {n: m.get("error", "") for n, m in metrics["methods"].items() if m.get("failed")}
    metrics = {**metrics, "methods": {n: m for n, m in metrics["methods"].items() if n not in failed}}
    missing = set(metrics["methods"]) - set(images_by_method)
    if missing:
        raise ValueError(f"images_by_method lacks the images of {sorted(missing)}")
    paths: dict[str, Path] = {
        "shares": plot_shares(metrics, out / "shares.png"),
        "tradeoff": plot_tradeoff(metrics, out / "tradeoff.png"),
    }
    grids: dict[str, str] = {}
    used: set[str] = set()
    for name in metrics["methods"]:
        fname = f"grid_{_safe(name)}.png"
        i = 2
        while fname in used:
            fname, i = f"grid_{_safe(name)}_{i}.png", i + 1
        used.add(fname)
        paths[f"grid:{name}"] = plot_grid(
            images_by_method[name], metrics, name, out / fname, columns=grid_columns
        )
        grids[name] = fname
    blocks = _blocks(metrics, {k: paths[k].name for k in ("shares", "tradeoff")}, grids)
    if failed:
        blocks += [("h2", "Failed methods")]
        blocks += [("p", f"`{name}` failed: {error}") for name, error in failed.items()]
    for fname, text in (("report.md", render_markdown(blocks)), ("report.html", render_html(blocks, out))):
        atomic_write_text(out / fname, text)
        paths[fname] = out / fname
    return paths
