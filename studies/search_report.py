"""Tables, figures and verdict of the "does the search pay?" study (studies/search_pays.py): results.md,
policy_per_round.png and runs.json in the results folder, one MLflow summary run per arm and unit."""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from studies.common import fmt, log_runs_to_mlflow, mean, mean_std, table
from studies.stats import Paired, paired, spearman

__all__ = ["report", "verdict", "compute_rows", "round_stats"]

ARM_LABEL = {"reward-guided": "reward-guided (REINFORCE)", "tpe": "TPE", "random": "random search",
             "tuned-named": "named losses, s tuned on a grid"}


def _test(arm: dict[str, Any], metric: str) -> float:
    value = arm.get("retrain", {}).get("test", {}).get(metric)
    return float(value) if value is not None else math.nan


def _champion(run: dict[str, Any]) -> dict[str, Any]:
    """The promoted candidate an arm picked on one unit."""
    return run["promoted"][run["champion_index"]]


def _unit(run: dict[str, Any]) -> tuple[int, int]:
    return run["seed"], run["draw"]


def by_unit(arms: list[dict[str, Any]], arm: str, metric: str) -> dict[Any, float]:
    """unit → the arm's champion test `metric` on that unit."""
    return {_unit(a): _test(a, metric) for a in arms if a["arm"] == arm}


def compute_rows(arms: list[dict[str, Any]], names: Iterable[str], design_repeats: int = 1) -> list[dict[str, Any]]:
    """Per arm, summed over units: proxy trainings, training images of the proxy trials, the promotions and the
    retraining; seconds. `design_repeats`: proxy trainings per point of the tuned-named grid."""
    rows = []
    for name in names:
        runs = [a for a in arms if a["arm"] == name]
        proxy = sum(r["images"] for a in runs for r in a["rows"])
        promo = sum(p["images"] for a in runs for p in a.get("promoted", []))
        retrain = sum(a.get("retrain", {}).get("images", 0) for a in runs)
        seconds = sum(r["seconds"] for a in runs for r in a["rows"]) + \
            sum(p["seconds"] for a in runs for p in a.get("promoted", [])) + \
            sum(a.get("retrain", {}).get("seconds", 0) for a in runs)
        repeats = design_repeats if name == "tuned-named" else 1  # a grid point is `repeats` proxy trainings
        rows.append({"arm": name, "units": len(runs), "proxy_trials": repeats * sum(len(a["rows"]) for a in runs),
                     "proxy_images": proxy, "promotion_images": promo, "retrain_images": retrain,
                     "total_images": proxy + promo + retrain, "seconds": seconds})
    return rows


def round_stats(arms: list[dict[str, Any]], arm: str, population: int) -> list[dict[str, Any]]:
    """Per round of `population` trials (trial number // population), over units: mean and best proxy reward,
    how many promoted candidates came from it."""
    runs = [a for a in arms if a["arm"] == arm]
    rounds = max((len(a["rows"]) for a in runs), default=0) // population
    out = []
    for k in range(rounds):
        rewards = [[r["reward"] for r in a["rows"][k * population:(k + 1) * population] if _ok(r["reward"])]
                   for a in runs]
        out.append({"round": k, "mean": mean(mean(r) for r in rewards), "best": mean(max(r) for r in rewards if r),
                    "promoted": sum(1 for a in runs for p in a.get("promoted", []) if p.get("number") is not None
                                    and p["number"] // population == k)})
    return out


def verdict(name: str, result: Paired, alpha: float) -> str:
    """One plain sentence: does reward-guided beat `name` on the paired test at `alpha`?"""
    if result.n == 0:
        return f"reward-guided vs {name}: no paired units."
    if result.p < alpha and result.ci[0] > 0:
        word = "beats"
    elif result.p < alpha and result.ci[1] < 0:
        word = "loses to"
    else:
        word = "does not differ significantly from"
    return f"- reward-guided **{word}** {name}: {result.text()} (reward-guided − {name})."


def _ok(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _round(value: int | None) -> str:
    return "—" if value is None else str(value)


def _spec_text(spec: dict[str, Any]) -> str:
    from marginsearch.losses import MarginSpec, identify

    s = MarginSpec.from_dict(spec)
    t = s.target
    name = identify(s)
    core = f"s={s.s:.3g}, m1={t.m1:.3g}, m2={t.m2_rad:.3g} rad, m3={t.m3_cos:.3g}"
    return f"{core} ({name})" if name else core


def _headline(design: dict[str, Any], arms: list[dict[str, Any]]) -> tuple[str, list[str], dict[str, Paired]]:
    metric, names = design["selection"]["metric"], design["search"]["arms"]
    resamples, alpha = design["test"]["bootstrap"], design["test"]["alpha"]
    rg = by_unit(arms, "reward-guided", metric)
    compute = {c["arm"]: c for c in compute_rows(arms, names, design["tuned_named"]["repeats"])}
    rows, lines, tests = [], [], {}
    for name in names:
        runs = [a for a in arms if a["arm"] == name]
        vals = by_unit(arms, name, metric)
        cell = "—"
        if name != "reward-guided":
            tests[name] = paired(rg, vals, resamples)
            cell = tests[name].text()
            lines.append(verdict(ARM_LABEL[name], tests[name], alpha))
        rows.append([ARM_LABEL[name], mean_std(vals.values()),
                     mean_std(_test(a, "auc") for a in runs), mean_std(_test(a, "accuracy") for a in runs),
                     mean_std(_champion(a)["full_val"] for a in runs if a.get("promoted")),
                     cell, f"{compute[name]['total_images'] / 1e6:.2f}"])
    header = ["arm", f"test {metric}", "test AUC", "test 10-fold acc.", f"val {metric} (promotion)",
              f"reward-guided − arm, test {metric}: mean [95 % CI], p", "training images (M)"]
    return table(header, rows), lines, tests


def _figure(design: dict[str, Any], arms: list[dict[str, Any]]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pop = design["search"]["population"]
    rg = [a for a in arms if a["arm"] == "reward-guided" and a.get("trajectory")]
    names = list(rg[0]["trajectory"][0]["mu_unit"]) if rg else []
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    for j, name in enumerate(names):
        for a in rg:
            mus = [snap["mu_unit"][name] for snap in a["trajectory"]]
            ax.plot(range(len(mus)), mus, color=f"C{j}", alpha=0.25, lw=0.8)
        mean_mu = [mean(a["trajectory"][k]["mu_unit"][name] for a in rg) for k in range(len(rg[0]["trajectory"]))]
        sig = [rg[0]["trajectory"][k]["sigma"] for k in range(len(mean_mu))]
        ax.plot(range(len(mean_mu)), mean_mu, color=f"C{j}", lw=2, label=name)
        ax.fill_between(range(len(mean_mu)), [m - s for m, s in zip(mean_mu, sig)],
                        [m + s for m, s in zip(mean_mu, sig)], color=f"C{j}", alpha=0.06)
    ax.set(title="reward-guided policy: μ ± σ (unit range)", xlabel="rounds done", ylabel="μ", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, name in enumerate(n for n in design["search"]["arms"] if n != "tuned-named"):
        stats = round_stats(arms, name, pop)
        ax.plot([s["round"] for s in stats], [s["mean"] for s in stats], marker="o", color=f"C{i}",
                label=f"{name} mean")
        ax.plot([s["round"] for s in stats], [s["best"] for s in stats], ls="--", color=f"C{i}", alpha=0.6)
    ax.set(title=f"proxy reward per round of {pop}: mean, best (dashed)", xlabel="round", ylabel="reward")
    ax.legend(fontsize=7)
    ax = axes[2]
    stats = round_stats(arms, "reward-guided", pop)
    ax.bar([s["round"] for s in stats], [s["promoted"] for s in stats], color="C0")
    ax.set(title="promoted reward-guided candidates: round", xlabel="round", ylabel="candidates")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def report(design: dict[str, Any], design_path: Path, data: dict[str, Any], out: Path, args: Any, seconds: float,
           argv: list[str] | None) -> Path:
    """results.md, policy_per_round.png, runs.json; the summary in MLflow."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    metric, arms = design["selection"]["metric"], data["arms"]
    command = " ".join(["python -m studies.search_pays", *(argv if argv is not None else sys.argv[1:])])
    units = ", ".join(f"seed {s} / draw {d}" for s, d in zip(design["units"]["seeds"], design["units"]["draws"]))
    sections: list[tuple[str, str]] = []
    head, lines, tests = _headline(design, arms)
    sections.append((f"Does the search pay? Champions on the test identities of `{design['benchmark']['preset']}` "
                     f"({len(design['units']['seeds'])} units: {units}; mean ± std in %)",
                     head + "\n\n" + "\n".join(lines)))
    p = data["proxy"]
    sections.append(("Proxy used by every arm (chosen in stage A by the design's rule)",
                     f"`{p['proxy']}` with reward `{p['reward']}`: Spearman ρ = {p['rho_val']:.2f} against the "
                     f"full-budget validation {metric} among the top half of a search "
                     f"({'reaches' if p['reached_goal'] else 'misses'} the goal {design['fidelity']['rho_goal']}); "
                     f"costs {p['cost']:.3f} × a full-budget training."))
    cr = compute_rows(arms, design["search"]["arms"], design["tuned_named"]["repeats"])
    sections.append(("Compute per arm, summed over units (training images seen; every epoch counted)",
                     table(["arm", "units", "proxy trainings", "proxy images", "promotion images", "retrain images",
                            "total images", "wall s"],
                           [[ARM_LABEL[c["arm"]], c["units"], c["proxy_trials"], c["proxy_images"],
                             c["promotion_images"], c["retrain_images"], c["total_images"], f"{c['seconds']:.0f}"]
                            for c in cr])))
    sections.append(_rounds_section(design, arms))
    sections.append(_fidelity_section(design, data))
    sections.append(_promoted_section(design, arms))
    sections.append(_transfer_section(design, data))
    sections.append(_sweep_section(design, data))
    sections.append(("Champions per arm and unit (chosen on full-budget validation; round = the proxy round it came "
                     "from)", table(["arm", "unit", "champion", "round", f"val {metric}", f"test {metric}"],
                                    [[a["arm"], f"{a['seed']}/{a['draw']}", _spec_text(a["champion"]),
                                      _round(_champion(a)["round"]),
                                      fmt(_champion(a)["full_val"]), fmt(_test(a, metric))]
                                     for a in arms if a.get("promoted")])))
    fig = _figure(design, arms)
    fig.tight_layout()
    fig.savefig(out / "policy_per_round.png", dpi=110)
    plt.close(fig)
    trained = sum(c["seconds"] for c in cr) + sum(t.get("seconds", 0) for t in data["transfer"] + data["sweep"]) \
        + sum(sum(x["seconds"] for x in (*r["proxies"].values(), r["full"])) for r in data["fidelity"])
    body = ["# Does the search pay?", "",
            f"Design: `{design_path.name}` (committed before the run; arms, units, budgets, metric and tests are "
            "fixed there). Selection reads validation only; test is read once per arm and unit, after selection.", ""]
    for title, text in sections:
        body += [f"## {title}", "", text, ""]
    body += ["![policy_per_round](policy_per_round.png)", "",
             f"Produced by `{command}` in {seconds:.0f} s ({os.cpu_count()} CPU cores, --jobs {args.jobs}; "
             f"{data['tasks']['ran']} tasks run, {data['tasks']['cached']} read from the cache of an earlier "
             f"invocation; {trained / 60:.0f} min of training summed over all trainings, cached ones included); "
             "intervals are 95 % percentile bootstrap intervals of the mean per-unit difference, p the exact "
             "two-sided sign-flip test."]
    (out / "results.md").write_text("\n".join(body) + "\n")
    (out / "summary.md").write_text(_summary(design, sections, command) + "\n")
    blob = {"design": design, "design_file": str(design_path), "command": command, "seconds": seconds,
            "tests": {k: vars(v) for k, v in tests.items()}, "compute": cr, **data}
    (out / "runs.json").write_text(json.dumps(blob, separators=(",", ":")))
    uri = args.mlflow or f"sqlite:///{out.parent / 'mlflow.db'}"
    log_runs_to_mlflow(uri, "study-search-pays", [
        {"arm": a["arm"], "seed": a["seed"], "draw": a["draw"], "champion": _spec_text(a["champion"]),
         f"test_{metric}": _test(a, metric), "test_auc": _test(a, "auc"),
         "val_promotion": _champion(a)["full_val"]} for a in arms if a.get("promoted")],
        lambda r: f"{r['arm']} seed {r['seed']} draw {r['draw']}")
    print("\n".join(body), flush=True)
    return out


def _summary(design: dict[str, Any], sections: list[tuple[str, str]], command: str) -> str:
    """The README's block: the headline table with its verdicts, the proxy line, the policy plot, the transfer table."""
    wanted = {"Does the search pay?", "Proxy used by every arm", "Transfer without searching again"}
    parts = []
    for title, text in sections:
        if any(title.startswith(w) for w in wanted):
            parts += [f"**{title}**", "", text, ""]
            if title.startswith("Proxy used"):
                parts += ["![policy per round](policy_per_round.png)", ""]
    parts.append(f"From `{command}`; every table of the run is in its results.md.")
    return "\n".join(parts)


def _rounds_section(design: dict[str, Any], arms: list[dict[str, Any]]) -> tuple[str, str]:
    pop = design["search"]["population"]
    rg = [a for a in arms if a["arm"] == "reward-guided" and a.get("trajectory")]
    names = list(rg[0]["trajectory"][0]["mu"]) if rg else []
    searches = [n for n in design["search"]["arms"] if n != "tuned-named"]
    stats = {n: round_stats(arms, n, pop) for n in searches}
    rows = []
    for k, s in enumerate(stats.get("reward-guided", [])):
        mus = [f"{mean(a['trajectory'][k]['mu'][n] for a in rg):.3g}" for n in names]
        rows.append([k, *(fmt(stats[n][k]["mean"]) + " / " + fmt(stats[n][k]["best"]) for n in searches),
                     *mus, f"{rg[0]['trajectory'][k]['sigma']:.2f}" if rg else "", s["promoted"]])
    header = ["round", *(f"{n} mean / best" for n in searches), *(f"μ {n} (before)" for n in names), "σ",
              "promoted from it"]
    return (f"Per round of {pop} trials, mean over units: proxy reward (%) and the reward-guided policy it sampled "
            "from (μ in native units)", table(header, rows))


def _fidelity_section(design: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    metric = design["selection"]["metric"]
    chosen = data["proxy"]
    rows = [[t["proxy"], t["reward"], f"{t['cost']:.3f}", f"{t['rho_val']:.2f}",
             " / ".join(f"{r:.2f}" for r in t["rho_val_per_seed"]), f"{t['rho_test']:.2f}",
             "**chosen**" if (t["proxy"], t["reward"]) == (chosen["proxy"], chosen["reward"]) else ""]
            for t in data["fidelity_table"]]
    n = len(data["fidelity_specs"])
    note = (f"\n\nReference points: the full budget's own seed-to-seed ρ (validation {metric}) is "
            f"{chosen['full_seed_to_seed_rho']:.2f}; full-budget validation vs test ρ is "
            f"{chosen['full_val_test_rho']:.2f}.")
    return (f"Proxy fidelity among the top half of a reward-guided search ({n} specs × "
            f"{len(design['fidelity']['seeds'])} seeds; ρ of a single-seed proxy against the seed-mean full budget)",
            table(["proxy", "reward", "cost (× full)", f"ρ vs full val {metric}", "per seed",
                   f"ρ vs full test {metric}", ""], rows) + note)


def _promoted_section(design: dict[str, Any], arms: list[dict[str, Any]]) -> tuple[str, str]:
    rows = []
    for name in design["search"]["arms"]:
        rhos = [spearman([p["proxy_reward"] for p in a["promoted"]], [p["full_val"] for p in a["promoted"]])
                for a in arms if a["arm"] == name and len(a.get("promoted", [])) >= 3]
        rows.append([ARM_LABEL[name], f"{mean(rhos):.2f}" if rhos else "n/a (fewer than 3 promoted)"])
    pooled_units: dict[Any, list[dict[str, Any]]] = {}
    for a in arms:
        pooled_units.setdefault(_unit(a), []).extend(a.get("promoted", []))
    pooled = [spearman([p["proxy_reward"] for p in ps], [p["full_val"] for p in ps]) for ps in pooled_units.values()]
    return ("Proxy vs full-budget validation among the promoted candidates",
            table(["arm", "ρ within an arm's promoted set"], rows)
            + f"\n\nAll arms' promoted candidates pooled per unit ({sum(len(v) for v in pooled_units.values())} "
              f"trainings): mean ρ = {mean(pooled):.2f} (per unit: {', '.join(f'{r:.2f}' for r in pooled)}).")


def _transfer_section(design: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    metric, picks = design["selection"]["metric"], data["transfer_picks"]
    labels = list(picks)
    rows = []
    for name in design["transfer"]["settings"]:
        runs = [t for t in data["transfer"] if t["setting"] == name]
        vals = {lab: {t["seed"]: float(t.get("test", {}).get(metric, math.nan) or math.nan)
                      for t in runs if t["label"] == lab} for lab in labels}
        cell = paired(vals[labels[0]], vals[labels[1]], design["test"]["bootstrap"]).text() \
            if len(labels) == 2 else "n/a"
        changes = ", ".join(f"{k} {v}" for k, v in design["transfer"][name].items())
        rows.append([name, changes, *(mean_std(vals[lab].values()) for lab in labels), cell])
    specs = "; ".join(f"{lab}: {_spec_text(spec)}" for lab, spec in picks.items())
    return (f"Transfer without searching again: test {metric} (%), {len(design['transfer']['seeds'])} seeds",
            f"Specs: {specs}.\n\n" + table(["setting", "what changes", *labels,
                                             f"{labels[0]} − {labels[-1]}: mean [95 % CI], p"], rows))


def _sweep_section(design: dict[str, Any], data: dict[str, Any]) -> tuple[str, str]:
    metric, sw = design["selection"]["metric"], design["scale_sweep"]
    rows = []
    for ids in sw["identities"]:
        cells = {s: [t.get("test", {}).get(metric) for t in data["sweep"] if t["identities"] == ids and t["s"] == s]
                 for s in sw["scales"]}
        best = max(sw["scales"], key=lambda s: mean(cells[s]) if math.isfinite(mean(cells[s])) else -1)
        rows.append([ids, *(mean_std(cells[s]) for s in sw["scales"]), f"{best:g}"])
    return (f"Scale s against the number of training classes: CosFace (m3 = 0.35), test {metric} (%), "
            f"{len(sw['seeds'])} seeds", table(["classes", *(f"s = {s:g}" for s in sw["scales"]), "best s"], rows))
