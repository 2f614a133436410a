"""One round of the feedback loop on ColoredDigits-Bias (issue 16), run as a user runs it: the four
commands of docs/feedback_loop.md, each a ``fairtune`` subprocess.

    bash scripts/demo.sh --single true        # the debiased adapter: runs/demo/debiased/adapter
    python benchmarks/feedback_loop.py        # -> benchmarks/results/feedback_loop.{json,md}

1. ``fairtune audit`` the debiased adapter on prompts it never trained on (the held-out digits with
   the training wording, and two new wordings of every digit);
2. ``fairtune flag add`` the ``--n_flag`` worst prompts (the direction seen: the class over its target),
   ``fairtune flag export`` them as a prompt file;
3. ``fairtune fit`` one round from the adapter (``--model.lora.init_from``) with the flagged prompts as
   the fairness loss's extra prompts (``--model.fairness.extra_prompts_file``) and the round overlay
   ``configs/colored_digits/feedback_round.yaml``;
4. ``fairtune audit`` the new adapter on the same prompts, seeds and judges.

Goals (issue 16): the flagged prompts' mean deviation falls by at least half, every other audited
prompt moves by at most +0.01, fidelity within 0.01.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import CLI

from _common import CLASSIFIER, DATA, JUDGES, ROOT, ensure_assets, write_results
from fairtune.eval import Goal, check_goal

CONFIGS = ROOT / "configs"
# Prompts the demo's adapter never trained on: digits 8 and 9 in the training wording, every digit in
# two wordings that appear nowhere in training (the fairness loss uses "a handwritten digit N").
UNSEEN = [
    {"name": "heldout", "role": "heldout", "template": "a handwritten digit {value}", "values": [8, 9],
     "concept": "digit {value}"},
    {"name": "drawing", "role": "paraphrase", "template": "a drawing of the number {value}",
     "values": list(range(10)), "concept": "digit {value}"},
    {"name": "sketch", "role": "paraphrase", "template": "a quick sketch of the numeral {value}",
     "values": list(range(10)), "concept": "digit {value}"},
]  # fmt: skip


def _fairtune(*args: str, log: Path) -> float:
    """Run one ``fairtune`` command (its output appended to ``log``); its wall time in seconds."""
    cmd = [sys.executable, "-m", "fairtune.cli", *map(str, args)]
    print("$ fairtune " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ fairtune " + " ".join(map(str, args)) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f"fairtune {args[0]} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def _audit(
    adapter: Path, prompts: Path, out: Path, n: int, steps: int, log: Path, *, model: str, judges: Path,
    reference: Path,
) -> tuple[dict, float]:  # fmt: skip
    if (out / "metrics.json").exists():  # a finished audit is kept (a restarted benchmark skips it)
        return json.loads((out / "metrics.json").read_text()), 0.0
    seconds = _fairtune(
        "audit", "--model", model, "--adapter", adapter, "--prompts", prompts, "--out", out,
        "--name", "adapter", "--judges", CONFIGS / "judges" / "colored_digits.yaml",
        "--judges.options", json.dumps({"path": str(judges), "color_judge": "hue"}),
        "--judges.reference", reference, "--target.attributes", "[color]",
        "--target.proportions", "uniform", "--generation.n_per_prompt", n, "--generation.steps", steps,
        "--generation.guidance_scale", 2.0, "--generation.seed", 0, log=log,
    )  # fmt: skip
    return json.loads((out / "metrics.json").read_text()), seconds


def _per_prompt(metrics: dict) -> dict[str, dict]:
    (method,) = metrics["methods"].values()
    return method["per_concept"]


def main(
    adapter: Path = ROOT / "runs" / "demo" / "debiased" / "adapter",
    out: Path = ROOT / "runs" / "bench" / "feedback_loop",
    n_flag: int = 4,
    n_per_prompt: int = 128,
    sampling_steps: int = 25,
    round_overlay: Path = CONFIGS / "colored_digits" / "feedback_round.yaml",
    fit_args: list[str] = [],
    model: str = "colored-digits-16",
    judges: Path = JUDGES,
    data: Path = DATA,
    recipe: list[Path] = [CONFIGS / "colored_digits" / "lora.yaml", CONFIGS / "ablations" / "all.yaml"],
    classifier_args: list[str] = [
        "--model.fairness.classifier.weights",
        str(CLASSIFIER / "classifier.safetensors"),
    ],
    name: str = "feedback_loop",
    preset: Literal["pixel", "sd"] = "pixel",
) -> None:
    """Audit, flag the worst prompts, train one round on the flags, audit again; write the table.

    Args:
        adapter: The debiased adapter to start from (the demo's ``debiased`` arm by default:
            ``bash scripts/demo.sh --single true``).
        out: Working folder (audits, flag database, the round's run).
        n_flag: How many of the worst audited prompts are flagged.
        n_per_prompt: Images per prompt in each audit.
        sampling_steps: DDIM steps of the audits.
        round_overlay: The round's config overlay, after lora.yaml and ablations/all.yaml.
        fit_args: Extra ``fairtune fit`` options (``--key value`` items) for the round.
        model: The base model the adapter was trained on (a folder or shipped name).
        judges: The benchmark's judges at the model's size (``fairtune judges train``).
        data: The ColoredDigits data folder: the round's training table and the audits' Fréchet reference.
        recipe: The round's configs before ``round_overlay`` (the adapter's own recipe and levers).
        classifier_args: ``fairtune fit`` options naming lever 3's classifier for ``recipe``.
        name: The results files' name (``benchmarks/results/<name>.{json,md}``).
        preset: ``sd``: ColoredDigits-SD instead, from the levers benchmark's ``all`` adapter (every
            lever; lever 3's classifier the CLIP probe): ``python benchmarks/colored_digits_sd.py
            levers`` first. It sets ``adapter``, ``out``, ``model``, ``judges``, ``data``, ``recipe``,
            ``classifier_args``, the sampler in ``fit_args``, and ``name`` (``feedback_loop_sd``).
    """
    if preset == "sd":
        import colored_digits_sd as sd

        from fairtune.cli import load_spec

        opt = sd.Options()
        (run_all,) = [r for r in load_spec(opt.levers_spec).runs if r.arm == "all"]
        adapter, out = opt.levers_out / "runs" / run_all.hash / "adapter", out.with_name(name + "_sd")
        model, judges, data, name = "colored-digits-sd32", opt.out / "judges", opt.data, name + "_sd"
        recipe = [
            CONFIGS / "colored_digits_sd" / "lora.yaml",
            CONFIGS / "colored_digits_sd" / "fairness.yaml",
        ]
        classifier_args = ["--model.fairness.classifier.init_args.probe", str(sd.color_probe(opt))]
        fit_args = ["--data.rebalance", json.dumps({"unknown": "keep"}), *fit_args]  # the all arm's sampler
    if not (adapter / "pytorch_lora_weights.safetensors").exists():
        sys.exit(
            f"no adapter at {adapter}: run "
            + (
                "`python benchmarks/colored_digits_sd.py levers`"
                if preset == "sd"
                else "`bash scripts/demo.sh --single true`"
            )
            + " first (or pass --adapter DIR)"
        )
    ensure_assets()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    prompts = out / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(UNSEEN, sort_keys=False))

    # 1. audit the adapter on prompts it never trained on
    where = {"model": model, "judges": judges, "reference": data}
    before, t_audit = _audit(
        adapter, prompts, out / "audit-before", n_per_prompt, sampling_steps, log, **where
    )
    rows_before = _per_prompt(before)
    classes = before["classes"]

    # 2. flag the worst prompts (as a reviewer would on the review page), export them
    t0 = time.perf_counter()
    worst = sorted(rows_before, key=lambda k: -(rows_before[k]["dev"] or 0))[:n_flag]
    db = out / "flags.sqlite"
    flagged_file = out / "flagged.yaml"
    if not flagged_file.exists():
        db.unlink(missing_ok=True)
        for key in worst:
            r = rows_before[key]
            over = max(range(len(classes)), key=lambda k: r["p_hat"][k] - r["target"][k])
            _fairtune(
                "flag", "add", "--db", db, "--model", model, "--adapter", adapter,
                "--prompt", r["prompt"], "--concept", r["concept"], "--attribute", "color",
                "--direction", classes[over], "--audit_run", out / "audit-before", "--reviewer", "benchmark",
                "--note", f"judged {classes[over]} {r['p_hat'][over]:.2f}", log=log,
            )  # fmt: skip
        _fairtune("flag", "export", "--db", db, "--out", flagged_file, log=log)
    t_flag = time.perf_counter() - t0

    # 3. one round: the flagged prompts as extra fairness prompts, from the current adapter
    run = out / "round-1"
    t_fit = 0.0
    if not (run / "adapter" / "pytorch_lora_weights.safetensors").exists():
        t_fit = _fairtune(
            "fit", *[a for c in [*recipe, round_overlay] for a in ("--config", c)],
            "--data.source.path", Path(data) / "table", *classifier_args,
            "--model.lora.init_from", adapter, "--model.fairness.extra_prompts_file", flagged_file,
            "--trainer.default_root_dir", run, *fit_args, log=log,
        )  # fmt: skip

    # 4. audit the new adapter on the same prompts, seeds and judges
    after, t_audit2 = _audit(
        run / "adapter", prompts, out / "audit-after", n_per_prompt, sampling_steps, log, **where
    )
    rows_after = _per_prompt(after)

    table, flagged_dev, other_moves = [], [[], []], []
    for key, b in rows_before.items():
        a = rows_after[key]
        is_flagged = key in worst
        table.append({
            "key": key, "prompt": b["prompt"], "role": b["role"], "flagged": is_flagged,
            "dev_before": b["dev"], "dev_before_ci": b["dev_ci"], "dev_after": a["dev"],
            "dev_after_ci": a["dev_ci"], "change": a["dev"] - b["dev"],
            "red_before": b["p_hat"][0], "red_after": a["p_hat"][0],
            "fidelity_before": b["fidelity"], "fidelity_after": a["fidelity"],
        })  # fmt: skip
        if is_flagged:
            flagged_dev[0].append(b["dev"])
            flagged_dev[1].append(a["dev"])
        else:
            other_moves.append(a["dev"] - b["dev"])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    sb, sa = before["methods"]["adapter"]["summary"], after["methods"]["adapter"]["summary"]
    result = {
        "adapter": str(adapter), "n_per_prompt": n_per_prompt, "sampling_steps": sampling_steps,
        "n_prompts": len(table), "flagged": worst,
        "flagged_mean_dev_before": mean(flagged_dev[0]), "flagged_mean_dev_after": mean(flagged_dev[1]),
        "flagged_reduction": 1 - mean(flagged_dev[1]) / mean(flagged_dev[0]),
        "others_mean_change": mean(other_moves), "others_max_change": max(other_moves),
        "others_over_0.01": sum(m > 0.01 for m in other_moves), "n_others": len(other_moves),
        "fidelity_before": sb["fidelity"], "fidelity_after": sa["fidelity"],
        "frechet_before": sb["frechet"], "frechet_after": sa["frechet"],
        "seconds": {"audit_before": t_audit, "flag_and_export": t_flag, "fit_round": t_fit,
                    "audit_after": t_audit2},
        "round_overlay": _rel(round_overlay), "fit_args": fit_args, "prompts": table, "model": model,
        "recipe": [_rel(c) for c in recipe], "classifier_args": classifier_args, "name": name,
        "preset": preset,
    }  # fmt: skip
    goals = [
        ("flagged mean dev falls by at least half", Goal("flagged_reduction", ">=", 0.5),
         result["flagged_reduction"]),
        ("every other prompt moves by at most +0.01", Goal("others_max_change", "<=", 0.01),
         result["others_max_change"]),
        ("fidelity within 0.01", Goal("fidelity_change", "<=", 0.01), abs(sa["fidelity"] - sb["fidelity"])),
    ]  # fmt: skip
    result["goals"] = {name: check_goal(goal, value)["met"] for name, goal, value in goals}
    write_results(name, result, _markdown(result))


def _rel(p: Path | str) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _markdown(r: dict) -> str:
    f = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    ci = lambda c: "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    s = r["seconds"]
    if r.get("preset", "pixel") == "pixel":
        command = (
            "Command: `python benchmarks/feedback_loop.py` (after `bash scripts/demo.sh --single true`); "
            "adapter "
        )
    else:
        command = (
            "Command: `python benchmarks/feedback_loop.py --preset sd` (after `python "
            f"benchmarks/colored_digits_sd.py levers`); model `{r['model']}`, adapter "
        )
    lines = [
        f"# {r.get('name', 'feedback_loop')}: one round on the {len(r['flagged'])} worst of "
        f"{r['n_prompts']} unseen prompts (N={r['n_per_prompt']}, {r['sampling_steps']} DDIM steps, "
        "hue judge)",
        "",
        command
        + f"`{_rel(r['adapter'])}`, round overlay `{r['round_overlay']}`"
        + (f", fit args `{' '.join(r['fit_args'])}`" if r["fit_args"] else "")
        + ".",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| flagged prompts: mean dev | {f(r['flagged_mean_dev_before'])} | {f(r['flagged_mean_dev_after'])} "
        f"({100 * r['flagged_reduction']:.0f}% lower) |",
        f"| other prompts: mean dev change | | {r['others_mean_change']:+.3f} "
        f"(max {r['others_max_change']:+.3f}; {r['others_over_0.01']}/{r['n_others']} over +0.01) |",
        f"| fidelity (all prompts) | {f(r['fidelity_before'])} | {f(r['fidelity_after'])} |",
        f"| Fréchet | {r['frechet_before']:.1f} | {r['frechet_after']:.1f} |",
        "",
        f"Time: audit {s['audit_before']:.0f} s, flag + export {s['flag_and_export']:.0f} s, "
        f"round `fairtune fit` {s['fit_round']:.0f} s, re-audit {s['audit_after']:.0f} s (the round: "
        f"{s['flag_and_export'] + s['fit_round'] + s['audit_after']:.0f} s).",
        "",
        "Goals: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["goals"].items()) + ".",
        "",
        "| prompt | role | flagged | red before | red after | dev before [95%] | dev after [95%] | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(r["prompts"], key=lambda p: (not p["flagged"], -p["dev_before"])):
        lines.append(
            f"| {p['prompt']} | {p['role']} | {'⚑' if p['flagged'] else ''} | {f(p['red_before'])} | "
            f"{f(p['red_after'])} | {f(p['dev_before'])}{ci(p['dev_before_ci'])} | "
            f"{f(p['dev_after'])}{ci(p['dev_after_ci'])} | {p['change']:+.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    CLI(main, as_positional=False)
