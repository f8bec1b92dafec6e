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


# The learning gate: a variant whose validation loss is within GATE_NATS of the unigram cross-entropy (the
# loss of a model that ignores context) did not learn at this budget; its quality numbers answer nothing.
GATE_NATS = 0.3
# What the learning gate leaves alone: costs, the tokenizer's numbers and what is measured at initialisation
# (none of them depends on the model having learned).
UNGATED_METRICS = re.compile(
    r"^(seconds@|activation_MB@|kv_cache_MB|generate_tokens_per_s|tokens_per_s|train_seconds|parameters|"
    r"tokens_per_byte|unk_rate|init_grad)"
)


def learned(table: dict, variant: str) -> bool | None:
    """Whether the variant's mean validation loss is more than GATE_NATS below the unigram reference
    (None when either is unknown)."""
    row = table[variant]
    if "val_loss" not in row or "unigram_entropy" not in row:
        return None
    return row["val_loss"]["mean"] < row["unigram_entropy"]["mean"] - GATE_NATS


def _gated(metric: str) -> bool:
    return UNGATED_METRICS.match(metric) is None


def _not_learned(table: dict, variant: str) -> str:
    row = table[variant]
    return (
        f"{variant} did not learn at this budget (validation loss {row['val_loss']['mean']:.3f} vs unigram "
        f"{row['unigram_entropy']['mean']:.3f} nats)"
    )


def _comparison(table: dict, a: str, b: str, metric: str) -> StatComparison:
    """a - b on `metric`, seed by seed (every variant runs the same seeds: a paired t-test)."""
    return compare(table[a][metric]["values"], table[b][metric]["values"], paired=True)


def answer(config: AblationConfig, table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The best variant on the metric among those that learned, whether its lead over the runner-up is
    significant (paired t-test over the seeds), and whether that agrees with the textbook's expected winner.
    No answer when the reference variant did not learn (quality metrics only)."""
    metric = config.metric
    withheld = [v for v in table if _gated(metric) and learned(table, v) is False]
    claims = [check_claim(config, claim, table) for claim in config.compare]

    def no_verdict(text: str, winner: str | None = None) -> dict[str, Any]:
        return {
            "text": text,
            "winner": winner,
            "measurable": False,
            "withheld": withheld,
            "disagrees": None,
            "claims": claims,
        }

    if config.reference_variant in withheld:
        return no_verdict(f"no answer at this scale: {_not_learned(table, config.reference_variant)}")
    scored = {
        name: row[metric]
        for name, row in table.items()
        if metric in row and math.isfinite(row[metric]["mean"]) and name not in withheld
    }
    if len(scored) == 1 and withheld:
        (only,) = scored
        reasons = "; ".join(_not_learned(table, v) for v in withheld)
        return no_verdict(f"only {only} learned at this budget: {reasons}", winner=only)
    if len(scored) < 2:
        return no_verdict(f"not enough finite {metric} values to compare")
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
    if withheld:
        text += "; left out: " + "; ".join(_not_learned(table, v) for v in withheld)
    return {
        "text": text,
        "winner": best if measurable else None,
        "measurable": measurable,
        "test": dataclasses.asdict(lead),
        "withheld": withheld,
        "disagrees": disagrees or any(c["verdict"] == "disagrees" for c in claims),
        "claims": claims,
    }


# A 'no difference' claim is judged by two one-sided tests at this level each: the 1 - 2 * alpha interval.
EQUIVALENCE_ALPHA = 0.05


def check_claim(config: AblationConfig, claim: Comparison, table: dict) -> dict[str, Any]:
    """Is the claim borne out? Paired t-test over the seeds; withheld when a variant did not learn (quality
    metrics). A `beats` claim: `better` significantly better agrees, significantly worse disagrees, neither is
    no measurable difference (untested with too few seeds). A `closer` claim is a `beats` claim on the
    distance |value - target|. A `no difference` claim is an equivalence test (two one-sided tests at 0.05: the
    90% interval of the paired difference): it agrees when the interval lies inside ±margin, disagrees when it
    lies wholly beyond the margin on one side, and is inconclusive otherwise."""
    metric = claim.metric or config.metric
    cited = {"source": claim.source, "published": claim.published, "scale_note": claim.scale_note}
    a, b = table[claim.better].get(metric), table[claim.worse].get(metric)
    base = {"better": claim.better, "worse": claim.worse, "metric": metric, "kind": claim.kind, **cited}
    base |= {"margin": claim.margin, "target": claim.target}
    if a is None or b is None:
        return {
            **base,
            "text": f"{claim.better} vs {claim.worse}: {metric} not measured for both",
            "verdict": None,
        }
    silent = [v for v in (claim.better, claim.worse) if _gated(metric) and learned(table, v) is False]
    if silent:
        reason = "; ".join(_not_learned(table, v) for v in silent)
        return {
            **base,
            "verdict": "withheld",
            "text": f"{claim.better} vs {claim.worse} on {metric}: withheld, {reason}",
        }
    numbers = f"{a['mean']:.4g} vs {b['mean']:.4g}"
    if claim.kind == "closer":
        distance = [[abs(v - claim.target) for v in row["values"]] for row in (a, b)]
        test = compare(*distance, paired=True)
        numbers += (
            f", distance to {claim.target:g}: {statistics.fmean(distance[0]):.4g} vs "
            f"{statistics.fmean(distance[1]):.4g}"
        )
        advantage = -test.difference
    elif claim.kind == "no difference":
        test = compare(a["values"], b["values"], paired=True, alpha=2 * EQUIVALENCE_ALPHA)
    else:
        test = _comparison(table, claim.better, claim.worse, metric)
        lower = config.lower_is_better if claim.lower_is_better is None else claim.lower_is_better
        advantage = -test.difference if lower else test.difference
    if claim.kind == "no difference":
        margin = claim.margin
        inside = test.tested and max(abs(test.low), abs(test.high)) <= margin
        beyond = test.tested and (test.low > margin or test.high < -margin)
        verdict = (
            "agrees" if inside else "disagrees" if beyond else "inconclusive" if test.tested else "untested"
        )
        words = {
            "agrees": f"the same within ±{margin:g} (the interval inside the margin): agrees with the textbook",
            "disagrees": f"a gap beyond ±{margin:g} (the interval wholly outside it): DISAGREES with the textbook",
            "inconclusive": f"inconclusive: the interval reaches beyond ±{margin:g} but not wholly outside it",
            "untested": "untested",
        }
    else:
        verdict = (
            ("agrees" if advantage > 0 else "disagrees")
            if test.significant
            else ("no measurable difference" if test.tested else "untested")
        )
        words = {"agrees": "agrees with the textbook", "disagrees": "DISAGREES with the textbook"}
    text = f"{claim.better} vs {claim.worse} on {metric}: {numbers}, {test.describe()}: " + words.get(
        verdict, verdict
    )
    return {**base, "verdict": verdict, "test": dataclasses.asdict(test), "text": text}


def claim_statement(claim: dict[str, Any]) -> str:
    """What the claim says, in words: 'a beats b on m', 'a and b do not differ on m (within ±0.02)', ..."""
    kind = claim.get("kind", "beats")
    if kind == "no difference":
        return f"{claim['better']} and {claim['worse']} do not differ on {claim['metric']} (within ±{claim['margin']:g})"
    if kind == "closer":
        return (
            f"{claim['better']} lies closer than {claim['worse']} to {claim['target']:g} on {claim['metric']}"
        )
    return f"{claim['better']} beats {claim['worse']} on {claim['metric']}"


def _reproduces(claim: dict[str, Any]) -> str:
    """Whether the measurement reproduces the published direction, in a word (and what scale may explain)."""
    verdict = claim.get("verdict")
    if verdict == "disagrees" and claim.get("kind") == "no difference":
        word = "NOT reproduced (a gap beyond the margin)"
        note = claim.get("scale_note")
        return word + (f"; at this scale: {note}" if note else "")
    word = {
        "agrees": "reproduced",
        "disagrees": "NOT reproduced (the opposite, significantly)",
        "no measurable difference": "not reproduced (no measurable difference)",
        "inconclusive": "inconclusive (neither shown the same within the margin nor shown beyond it)",
        "untested": "untested",
        "withheld": "withheld (did not learn)",
    }.get(verdict, "not measured")
    note = claim.get("scale_note")
    if verdict in ("disagrees", "no measurable difference", "inconclusive") and note:
        word += f"; at this scale: {note}"
    return word


def format_report(config: AblationConfig, result: dict[str, Any], plots: list[Path]) -> str:
    table = result["table"]
    claims = result["answer"].get("claims", [])
    # the headline table: the question's metric, the claims' metrics and the learning gate's numbers; every
    # other measurement in a second table (per-layer values stay in results.json)
    headline = [config.metric, *(c["metric"] for c in claims), "val_loss", "unigram_entropy"]
    columns = [c for c in dict.fromkeys(headline) if any(c in row for row in table.values())]
    per_layer = re.compile(r"_L\d+$")
    others = sorted({k for row in table.values() for k in row if not per_layer.search(k)} - set(columns))
    unigram = [row["unigram_entropy"]["mean"] for row in table.values() if "unigram_entropy" in row]
    scale = f"scale `{config.scale}`" if config.scale else "the question as written"
    lines = [
        f"# {config.question}",
        "",
        f"**Textbook:** {config.textbook}",
        "",
        f"**Measured answer** ({scale}, {len(config.seeds)} seeds): {result['answer']['text']}.",
        "",
    ]
    if claims:
        lines += [
            "| claim | source | published | measured | reproduces? |",
            "|---|---|---|---|---|",
            *(
                f"| {claim_statement(c)} | {c.get('source') or ''} | "
                f"{c.get('published') or ''} | {c['text'].split(': ', 1)[-1]} | {_reproduces(c)} |"
                for c in claims
            ),
            "",
        ]
    if unigram:
        lines += [
            f"Learning gate: the unigram cross-entropy of the validation tokens is {min(unigram):.3f} nats per "
            f"token"
            + (f" (to {max(unigram):.3f} across tokenizers)" if max(unigram) - min(unigram) > 1e-6 else "")
            + f"; a variant whose validation loss is within {GATE_NATS} nats of it did not learn at this budget "
            "and is left out of every verdict on quality.",
            "",
        ]
    lines += [
        f"{len(config.seeds)} seeds per variant (mean ± std); differences judged with a paired t-test over the "
        f"seeds (scipy.stats.ttest_rel) at the 0.05 level, or exact where the seed changes nothing (parameters, "
        f"FLOPs, the memory of a fixed input)"
        + (
            f"; a claim of no difference by two one-sided tests at {EQUIVALENCE_ALPHA:g} (the "
            f"{(1 - 2 * EQUIVALENCE_ALPHA) * 100:g}% interval of the paired difference inside its margin)"
            if any(c.get("kind") == "no difference" for c in claims)
            else ""
        )
        + f"; base run `{config.base.config}` with `{json.dumps(config.base.overrides)}`.",
        "",
        "| variant | overrides | learned? | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]

    def cell(row: dict, column: str) -> str:
        return f"{row[column]['mean']:.4g} ± {row[column]['std']:.2g}" if column in row else "n/a"

    for name, row in table.items():
        gate = {True: "yes", False: "NO", None: "n/a"}[learned(table, name)]
        lines.append(
            f"| {name} | `{json.dumps(config.variants[name])}` | {gate} | "
            + " | ".join(cell(row, c) for c in columns)
            + " |"
        )
    if others:
        lines += ["", "All measurements (mean ± std over seeds; per layer: results.json)", ""]
        lines += ["| measurement | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
        lines += [f"| {m} | " + " | ".join(cell(row, m) for row in table.values()) + " |" for m in others]
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
    """OUT/README.md: one line per question with its measured answer, whether each published claim is
    reproduced, the training seconds of its runs (from their summaries: what the answer cost, whenever it was
    computed) and the wall time of this invocation (n/a for a question missing from `seconds`; runs read back
    from an earlier invocation cost none)."""
    from twinlm.fileio import write_text_atomic

    scales = sorted({str(r.get("scale")) for r in results.values() if r.get("scale")})
    lines = [
        "# Ablations: the classic Transformer questions, measured"
        + (f" (scale: {', '.join(scales)})" if scales else ""),
        "",
        "Written by `twinlm ablate configs/ablations/*.yaml`; each link is a full report (the table over seeds, "
        "the tests, the learning gate, every claim with its source).",
        "",
        "| question | measured answer | reproduces the literature? (claims: yes / no / no measurable difference "
        "/ inconclusive / withheld / untested) | training s of its runs | wall s of this invocation |",
        "|---|---|---|---|---|",
    ]
    trained = {name: _training_seconds(result) for name, result in results.items()}
    for name, result in results.items():
        claims = [c.get("verdict") for c in result["answer"].get("claims", [])]
        counts = " / ".join(
            str(claims.count(v))
            for v in (
                "agrees",
                "disagrees",
                "no measurable difference",
                "inconclusive",
                "withheld",
                "untested",
            )
        )
        lines.append(
            f"| [{result['question']}]({name}/report.md) | {result['answer']['text']} | {counts} | "
            + (f"{trained[name]:.0f} | " if trained[name] is not None else "n/a | ")
            + (f"{seconds[name]:.0f} |" if name in seconds else "n/a |")
        )
    lines += [
        "",
        f"Total wall time of this invocation: {sum(seconds.values()):.0f} s over {len(seconds)} question(s); "
        "training seconds count a run shared by several questions in each.",
    ]
    return write_text_atomic(out / "README.md", "\n".join(lines) + "\n", "the index")


def _training_seconds(result: dict[str, Any]) -> float | None:
    """The summed train_seconds of a question's runs (every variant, every seed), None when none says."""
    rows = [row["train_seconds"] for row in result.get("table", {}).values() if "train_seconds" in row]
    return sum(r["mean"] * r["n"] for r in rows) if rows else None
