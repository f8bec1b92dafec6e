"""From finished runs to an answer: the table over seeds, the verdicts (twinlm.stats), report and plots."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from twinlm.ablation.config import AblationConfig, Comparison
from twinlm.stats import Comparison as StatComparison
from twinlm.stats import compare, summarize


def _aggregate(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> metric -> {mean, std, n, values (one per seed, in the question's seed order)}."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name in variants:
        values = [r["values"] for r in runs if r["variant"] == name]
        keys = [
            k
            for k in values[0]
            if all(isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool) for v in values)
        ]
        table[name] = {k: dataclasses.asdict(summarize([v[k] for v in values])) for k in keys}
    return table


def _comparison(table: dict, a: str, b: str, metric: str) -> StatComparison:
    """a - b on `metric`, seed by seed (every variant runs the same seeds: a paired t-test)."""
    return compare(table[a][metric]["values"], table[b][metric]["values"], paired=True)


def answer(config: AblationConfig, table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The best variant on the metric, whether its lead over the runner-up is significant (paired t-test over
    the seeds), and whether that agrees with the textbook's expected winner."""
    metric = config.metric
    scored = {
        name: row[metric]
        for name, row in table.items()
        if metric in row and math.isfinite(row[metric]["mean"])
    }
    if len(scored) < 2:
        return {"text": f"not enough finite {metric} values to compare", "winner": None, "measurable": False}
    order = sorted(scored, key=lambda n: scored[n]["mean"], reverse=not config.lower_is_better)
    best, second = order[0], order[1]
    lead = _comparison(table, best, second, metric)
    measurable = lead.significant
    numbers = f"{scored[best]['mean']:.4f} vs {second} {scored[second]['mean']:.4f}: {lead.describe()}"
    text = (
        f"{best} is best on {metric} ({numbers})"
        if measurable
        else f"no measurable difference on {metric} between {best} and {second} ({numbers})"
    )
    disagrees = None
    if config.expect is not None and config.expect in scored:
        beaten = any(
            (scored[n]["mean"] < scored[config.expect]["mean"]) == config.lower_is_better
            and _comparison(table, n, config.expect, metric).significant
            for n in scored
            if n != config.expect
        )
        disagrees = bool(beaten)
        if disagrees:
            text += f". DISAGREES with the textbook, which expects {config.expect} to win"
        elif measurable and best == config.expect:
            text += ". Agrees with the textbook"
    claims = [check_claim(config, claim, table) for claim in config.compare]
    return {
        "text": text,
        "winner": best if measurable else None,
        "measurable": measurable,
        "test": dataclasses.asdict(lead),
        "disagrees": disagrees or any(c["verdict"] == "disagrees" for c in claims),
        "claims": claims,
    }


def check_claim(config: AblationConfig, claim: Comparison, table: dict) -> dict[str, Any]:
    """Does `better` beat `worse` significantly (agrees), the reverse (disagrees), or neither (no measurable
    difference; untested with too few seeds)? Paired t-test over the seeds."""
    metric = claim.metric or config.metric
    lower = config.lower_is_better if claim.lower_is_better is None else claim.lower_is_better
    a, b = table[claim.better].get(metric), table[claim.worse].get(metric)
    if a is None or b is None:
        return {"text": f"{claim.better} vs {claim.worse}: {metric} not measured for both", "verdict": None}
    test = _comparison(table, claim.better, claim.worse, metric)
    advantage = -test.difference if lower else test.difference
    verdict = (
        ("agrees" if advantage > 0 else "disagrees")
        if test.significant
        else ("no measurable difference" if test.tested else "untested")
    )
    text = (
        f"{claim.better} vs {claim.worse} on {metric}: {a['mean']:.4g} vs {b['mean']:.4g}, {test.describe()}: "
        + {
            "agrees": "agrees with the textbook",
            "disagrees": "DISAGREES with the textbook",
        }.get(verdict, verdict)
    )
    return {
        "better": claim.better,
        "worse": claim.worse,
        "metric": metric,
        "verdict": verdict,
        "test": dataclasses.asdict(test),
        "text": text,
    }


def format_report(config: AblationConfig, result: dict[str, Any], plots: list[Path]) -> str:
    table = result["table"]
    # per-layer values stay in results.json; the table shows the headline numbers
    per_layer = re.compile(r"_L\d+$")
    names = {k for row in table.values() for k in row if not per_layer.search(k)}
    columns = [config.metric] + sorted(names - {config.metric})
    lines = [
        f"# {config.question}",
        "",
        f"**Textbook:** {config.textbook}",
        "",
        f"**Measured answer:** {result['answer']['text']}.",
        "",
        *(f"- Textbook claim {c['text']}." for c in result["answer"].get("claims", [])),
        "",
        f"{len(config.seeds)} seeds per variant (mean ± std); differences judged with a paired t-test over the "
        f"seeds (scipy.stats.ttest_rel) at the 0.05 level; base run `{config.base.config}` with "
        f"`{json.dumps(config.base.overrides)}`.",
        "",
        "| variant | overrides | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for name, row in table.items():
        cells = [f"{row[c]['mean']:.4g} ± {row[c]['std']:.2g}" if c in row else "n/a" for c in columns]
        lines.append(f"| {name} | `{json.dumps(config.variants[name])}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot_ablation(config: AblationConfig, runs: list[dict], table: dict, out: Path) -> list[Path]:
    """Training-loss curves (mean over seeds) and a bar chart of the metric with seed error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twinlm.fileio import atomic_file

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name in config.variants:
        per_seed = [dict(r["curve"]) for r in runs if r["variant"] == name and r["curve"]]
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        if steps:
            curves.plot(steps, [statistics.fmean(c[s] for c in per_seed) for s in steps], label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("train loss")
    if curves.lines:
        curves.legend(fontsize=8)
    names = [n for n in config.variants if config.metric in table[n]]
    bars.bar(
        names,
        [table[n][config.metric]["mean"] for n in names],
        yerr=[table[n][config.metric]["std"] for n in names],
        capsize=4,
    )
    bars.set_ylabel(config.metric)
    bars.tick_params(axis="x", rotation=30)
    fig.suptitle(config.question, fontsize=10)
    fig.tight_layout()
    path = out / "results.png"
    with atomic_file(path, "the plot") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return [path]


def write_index(results: dict[str, dict[str, Any]], seconds: dict[str, float], out: Path) -> Path:
    """OUT/README.md: one line per question with its measured answer, textbook verdicts and wall time
    (n/a for a question missing from `seconds`)."""
    lines = [
        "# Ablations: the classic Transformer questions, measured",
        "",
        "Written by `make ablate` (`twinlm ablate configs/ablations/*.yaml`); each link is a full report.",
        "",
        "| question | measured answer | textbook claims (agree / disagree / no measurable difference / untested) "
        "| wall s |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        claims = [c.get("verdict") for c in result["answer"].get("claims", [])]
        counts = " / ".join(
            str(claims.count(v)) for v in ("agrees", "disagrees", "no measurable difference", "untested")
        )
        lines.append(
            f"| [{result['question']}]({name}/report.md) | {result['answer']['text']} | {counts} | "
            + (f"{seconds[name]:.0f} |" if name in seconds else "n/a |")
        )
    lines += ["", f"Total wall time: {sum(seconds.values()):.0f} s over {len(seconds)} question(s)."]
    from twinlm.fileio import write_text_atomic

    return write_text_atomic(out / "README.md", "\n".join(lines) + "\n", "the index")
