"""The demo's own result, committed: ``benchmarks/results/demo_metrics.json`` and ``demo.md``.

    bash scripts/demo.sh                      # writes runs/demo (compare/metrics.json, demo.json)
    python benchmarks/demo_results.py         # tabulates that run into benchmarks/results/
    python benchmarks/demo_results.py --demo committed   # re-renders the committed run's table and
                                              # checks it against the committed pair's range again

Nothing is generated or judged here: the figures are the demo run's (``fairtune demo``), read from its
``compare/metrics.json`` and ``demo.json`` (the stage timings the demo records), and its pair's figures
are checked against the range of one run in the committed pair results, as the demo prints them.
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import FAIRNESS_COLUMNS, ROOT, cell, write_results

# The demo's roles (digits 0-7 trained, 8 named without data, 9 never named, a paraphrase) and explicit
# prompts kept: where each method holds and where it breaks.
COLUMNS = [
    ("mean_dev_seen", "mean dev seen", 3),
    ("worst_dev_seen", "worst seen", 3),
    ("mean_dev_named", "named, no data", 3),
    ("mean_dev_heldout", "never named", 3),
    ("mean_dev_paraphrase", "paraphrase", 3),
    ("explicit_kept", "explicit kept", 3),
    *[c for c in FAIRNESS_COLUMNS if c[0] in ("fidelity", "frechet")],
    ("sec_per_image", "s/img", 3),
    ("unet_evals_per_image", "UNet evals/img", 0),
]


def main(demo: str = str(ROOT / "runs" / "demo"), wall_seconds: float | None = None) -> None:
    """Tabulate a finished demo run into ``benchmarks/results/demo_metrics.json`` and ``demo.md``.

    Args:
        demo: The demo's output folder, or ``committed`` (see :func:`render`).
        wall_seconds: The whole ``bash scripts/demo.sh`` wall time, measured outside (install included).
    """
    payload, md = render(demo, wall_seconds)
    write_results("demo_metrics", payload, md)
    (ROOT / "benchmarks" / "results" / "demo_metrics.md").rename(ROOT / "benchmarks" / "results" / "demo.md")


def render(demo: str, wall_seconds: float | None = None) -> tuple[dict, str]:
    """A finished demo run's payload and markdown table.

    Args:
        demo: The demo's output folder, or ``committed``: the run already in
            ``benchmarks/results/demo_metrics.json`` (its figures as they are, checked again against
            the committed pair's range).
        wall_seconds: The whole ``bash scripts/demo.sh`` wall time, measured outside (install included).
    """
    from fairtune.colored_digits._demo import beside_committed, committed_pair

    if demo == "committed":
        payload = json.loads((ROOT / "benchmarks" / "results" / "demo_metrics.json").read_text())
        methods = payload["methods"]
        wall_seconds = payload.get("wall_seconds") if wall_seconds is None else wall_seconds
        payload["wall_seconds"] = wall_seconds
    else:
        metrics = json.loads((Path(demo) / "compare" / "metrics.json").read_text())
        record = json.loads((Path(demo) / "demo.json").read_text())
        methods = {
            name: {**m["summary"], "kind": m["kind"], "adapter_scale": m.get("adapter_scale", 1.0)}
            for name, m in metrics["methods"].items()
        }
        payload = {
            "command": "bash scripts/demo.sh",
            "settings": {k: record[k] for k in ("steps", "n_per_prompt", "sampling_steps")},
            "seed": record.get("seed", 0),
            "timings_s": {k: v for k, v in record.items() if k.endswith("_s")},
            "wall_seconds": wall_seconds,
            "generation": metrics["generation"],
            "methods": methods,
        }
    settings = payload["settings"]
    record = {**settings, **payload["timings_s"]}
    pair = methods.get("class_pair")
    checks = []
    if pair is not None:
        # The demo's own check, again: against the committed pair at the demo's scale (the compare
        # config's; 1.5 when the run predates recording it).
        steps = settings["steps"]
        committed = committed_pair(pair.get("adapter_scale", 1.5), steps)
        seed = payload.get("seed", 0)
        checks = beside_committed(pair, steps=steps, seed=seed, path=ROOT / committed, arm="class_pair")
        payload["beside_committed"] = {"file": committed, "checks": checks}
    t = payload["timings_s"]
    lines = [
        f"# The demo (`bash scripts/demo.sh`): {record['steps']} training steps per adapter, N = "
        f"{record['n_per_prompt']} per prompt, {record['sampling_steps']} DDIM steps",
        "",
        "| method | " + " | ".join(c[1] for c in COLUMNS) + " | undetermined |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, s in methods.items():
        ci = s.get("mean_dev_seen_ci")
        cells = []
        for key, _, digits in COLUMNS:
            text = cell(s.get(key), digits)
            if key == "mean_dev_seen" and ci:
                text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            cells.append(text)
        und = f"{int(s.get('undetermined') or 0)}/{int(s.get('n_images') or 0)}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {und} |")
    lines += [
        "",
        "Columns: docs/metrics.md (dev = max over inks of |share − target|, target uniform; mean dev seen "
        "with its 95% simultaneous interval; undetermined = images the hue judge could not place, e.g. "
        "mixed inks).",
        "",
        f"Time (this run, `runs/demo/demo.json`): assets {t.get('assets_s', 0):.0f} s, training "
        + ", ".join(f"{k[6:-2]} {v:.0f} s" for k, v in t.items() if k.startswith("train_"))
        + f", comparison {t.get('compare_s', 0):.0f} s; `fairtune demo` {t.get('total_s', 0) / 60:.1f} min"
        + (
            f", `bash scripts/demo.sh` (fresh clone, install included) {wall_seconds / 60:.1f} min"
            if wall_seconds
            else ""
        )
        + ".",
    ]
    if checks:
        inside = sum(c["inside"] for c in checks)
        lines += [
            "",
            f"class_pair beside `{payload['beside_committed']['file']}` (the 95% range of one run over its "
            f"seeds, widened by each figure's sampling spread; docs/metrics.md): {inside} of {len(checks)} "
            "inside.",
            "",
            "| column | this run | committed mean | range of one run | |",
            "|---|---|---|---|---|",
            *(
                f"| {c['metric']} | {c['value']:.3f} | {c['mean']:.3f} | [{c['range'][0]:.3f}, "
                f"{c['range'][1]:.3f}] | {'inside' if c['inside'] else '**outside**'} |"
                for c in checks
            ),
        ]
    return payload, "\n".join(lines) + "\n"


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
