"""The consistency analysis's text outputs: the report printed and saved, and the LaTeX table."""

from __future__ import annotations

from analysis.report import STARS_LEGEND, fmt_p, latex_table, stars, tex, tex_p


def summary_text(result: dict) -> str:
    """The table and the summary, for the terminal and consistency_report.txt."""
    s = result["summary"]
    pct = round(100 * result["ci_level"])
    lines = [
        f"Train vs validation consistency of block importance, model {result['model']}",
        f"Spearman r over blocks; {pct}% CI: bootstrap over examples, {result['n_resamples']} resamples "
        f"(seed {result['seed']}); consistent when r >= {result['threshold']}; {STARS_LEGEND}",
        "",
        f"{'dataset':<24}{'blocks':>7}{'n_train':>9}{'n_val':>7}{'spearman_r':>12}  {'p':<10}{'CI':<18}"
        f"{'kendall_tau':>12}  consistent",
    ]
    for d in result["datasets"].values():
        r = "n/a" if d["spearman_r"] is None else f"{d['spearman_r']:.4f}"
        ci = "n/a" if d["ci_low"] is None else f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
        p = fmt_p(d["p_value"])
        tau = "n/a" if d["kendall_tau"] is None else f"{d['kendall_tau']:.4f}"
        lines.append(
            f"{d['dataset']:<24}{d['n_blocks']:>7}{d['n_examples_train']:>9}{d['n_examples_validation']:>7}"
            f"{r:>9}{stars(d['p_value']):<3}  {p:<10}{ci:<18}{tau:>12}  {'yes' if d['consistent'] else 'no'}"
        )
    mean = "n/a" if s["mean_r"] is None else f"{s['mean_r']:.4f}"
    lines += [
        "",
        f"consistent: {s['n_consistent']}/{s['n_datasets']} datasets; mean Spearman r {mean} (over {s['n_with_r']} datasets)",
    ]
    lines += [
        f"{d['dataset']}: {d['n_resamples'] - d['n_resamples_valid']} of {d['n_resamples']} resamples gave a constant "
        "importance vector (r undefined) and are left out of the interval"
        for d in result["datasets"].values()
        if d["n_resamples_valid"] < d["n_resamples"]
    ]
    lines += [f"skipped {t}: {why}" for t, why in result["skipped"].items()]
    lines += ["runs used (latest FINISHED study per split):"]
    lines += [f"  {t}: train {u['train']}, validation {u['validation']}" for t, u in result["runs_used"].items()]
    return "\n".join(lines) + "\n"


def latex(result: dict) -> str:
    """consistency_table.tex."""
    s = result["summary"]
    rows = []
    for d in result["datasets"].values():
        r = "--" if d["spearman_r"] is None else f"{d['spearman_r']:.4f}"
        ci = "--" if d["ci_low"] is None else f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
        tau = "--" if d["kendall_tau"] is None else f"{d['kendall_tau']:.4f}"
        rows.append(
            [
                tex(d["dataset"]),
                str(d["n_blocks"]),
                str(d["n_examples_train"]),
                str(d["n_examples_validation"]),
                r,
                ci,
                tex_p(d["p_value"]),
                tau,
                "yes" if d["consistent"] else "no",
            ]
        )
    mean = "--" if s["mean_r"] is None else f"{s['mean_r']:.4f}"
    caption = (
        f"Train vs validation consistency of block importance ({tex(result['model'])}). Spearman $r$ over blocks; "
        f"{round(100 * result['ci_level'])}\\% CI: bootstrap over examples ({result['n_resamples']} resamples); "
        f"consistent when $r \\ge {result['threshold']}$: {s['n_consistent']}/{s['n_datasets']}, mean $r$ = {mean}."
    )
    header = [
        "Dataset",
        "Blocks",
        r"$n_\mathrm{train}$",
        r"$n_\mathrm{val}$",
        r"Spearman $r$",
        f"{round(100 * result['ci_level'])}\\% CI",
        "$p$",
        r"Kendall $\tau$",
        "Consistent",
    ]
    return latex_table(header, rows, "lrrrrcrrc", caption, "tab:consistency")
