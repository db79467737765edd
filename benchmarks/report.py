"""The benchmark's results: the summary keys other tools read, and the Markdown table of latest.md."""

from __future__ import annotations

import functools
import operator

from benchmarks.common import LLAMA3_8B

# the top-level keys other tools read: part -> {key: path of the value within the part}
SUMMARY_KEYS = {
    "sensitivity": {"sensitivity_speedup": ("speedup",), "sensitivity_max_abs_diff": ("max_abs_diff",)},
    "scale_sensitivity": {"scale_sensitivity_speedup": ("speedup",), "scale_max_abs_diff": ("max_abs_diff",)},
    "sublayer_sensitivity": {
        "sublayer_sensitivity_speedup": ("speedup",),
        "sublayer_sensitivity_max_abs_diff": ("max_abs_diff",),
    },
    "racing": {"racing_eval_ratio": ("eval_ratio",), "racing_same_recommendations": ("same_recommendations",)},
    "multiple_choice": {"mc_speedup_vs_lm_eval": ("speedup",), "mc_acc_equal": ("acc_equal",)},
    "forward": {"mfu": ("ours", "mfu"), "mfu_plain_transformers": ("plain", "mfu")},
    "scoring": {"scoring_compiled_speedup": ("compiled_speedup",), "scoring_flex_speedup": ("flex_speedup",)},
    "gpu_scoring": {
        "gpu_scoring_tokens_per_s": ("paths", "compiled_flex", "tokens_per_s"),
        "gpu_scoring_mfu": ("paths", "compiled_flex", "mfu"),
        "gpu_compiled_speedup": ("compiled_speedup",),
        "gpu_flex_speedup": ("flex_speedup",),
        "gpu_scoring_device": ("device",),
        "gpu_scoring_date": ("date",),
    },
}


def summary(results: dict) -> dict:
    """The top-level keys other tools read (SUMMARY_KEYS) of the parts measured."""
    flat = {"device": results.get("device")}
    for part, keys in SUMMARY_KEYS.items():
        if part in results:
            flat |= {key: functools.reduce(operator.getitem, path, results[part]) for key, path in keys.items()}
    return flat


def _samples(part: dict) -> str:
    """Examples per task of a measurement, e.g. `piqa 4, arc_easy 4`."""
    return ", ".join(f"{k} {v['n']}" for k, v in part["tasks"].items())


def markdown(results: dict) -> str:
    """The results as a Markdown table, one row per measurement."""
    rows = [
        "| measurement | ours | baseline | ratio | target | samples | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows += _sensitivity_rows(results)
    if "racing" in results:
        rows.append(_racing_row(results["racing"]))
    if "multiple_choice" in results:
        rows.append(_mc_row(results["multiple_choice"]))
    if "forward" in results:
        rows += _forward_rows(results["forward"])
    for key in ("scoring", "gpu_scoring"):
        if key in results:
            rows.append(_scoring_row(key, results[key]))
    versions = results.get("versions", {})
    return "\n".join(rows) + "\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n"


def _sensitivity_rows(results: dict) -> list[str]:
    rows = []
    for key, label, target in (
        ("sensitivity", "whole-data budget", ">= 1.5x, identical"),
        ("scale_sensitivity", "budget of 1/30 of the data's block states", ">= 1.5x, identical"),
        ("sublayer_sensitivity", "whole-data budget", ">= 1.5x, identical"),
    ):
        if key in results:
            r = results[key]
            samples = _samples(r)
            what = "sublayer sensitivity study (attention and MLP)" if key == "sublayer_sensitivity" else "sensitivity study"
            rows.append(
                f"| {what}, {r['configs']} configurations, step-wide vs each alone ({label}: "
                f"{r['chunks']} chunks, kept states <= {r['kept_states_mb']:.0f} of {r['dataset_states_mb']:.0f} MB) "
                f"| {r['seconds_stepwide']:.1f} s | {r['seconds_from_scratch']:.1f} s | {r['speedup']:.2f}x "
                f"(max abs diff {r['max_abs_diff']:.1g}) | {target} | {samples} | {r['device']} | {r['date']} |"
            )
    return rows


def _racing_row(r: dict) -> str:
    samples = _samples(r)
    return (
        f"| beam search (width {r['beam_width']}, up to {r['max_removed']} removed), racing vs exhaustive: "
        f"example-configurations scored ({r['racing']['stopped']} candidates stopped) "
        f"| {r['racing']['example_configs']:,} ({r['racing']['seconds']:.0f} s) "
        f"| {r['exhaustive']['example_configs']:,} ({r['exhaustive']['seconds']:.0f} s) "
        f"| {r['eval_ratio']:.2f}x fewer (at most {r['eval_ratio_ceiling']:.2f}x at this size), {r['speedup']:.2f}x "
        f"faster (same recommendations: {'yes' if r['same_recommendations'] else 'NO'}) | >= 3x, identical | {samples} "
        f"| {r['device']} | {r['date']} |"
    )


def _mc_row(m: dict) -> str:
    samples = _samples(m)
    accs = "; ".join(
        f"{k} acc {v['acc']:.3f}/{v['acc_lm_eval']:.3f}, acc_norm {v['acc_norm']:.3f}/{v['acc_norm_lm_eval']:.3f}"
        for k, v in m["tasks"].items()
    )
    return (
        f"| multiple choice vs lm-eval's HFLM.loglikelihood ({accs}) | {m['seconds_ours']:.1f} s "
        f"| {m['seconds_lm_eval']:.1f} s "
        f"| {m['speedup']:.2f}x (identical: {'yes' if m['acc_equal'] else 'NO'}) | >= 2x, identical "
        f"| {samples} x {m['repeats']} | {m['device']} | {m['date']} |"
    )


def _forward_rows(f: dict) -> list[str]:
    def rate(r):
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        return f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops']:.0f} TFLOP/s{mfu}"

    samples = f"{f['tokens_per_pass']:,} tokens ({f['batch_size']} x {f['seq_len']}) x {f['repeats']}"
    shape = {k: v for k, v in f["shape"].items() if k != "family"}
    model = "Llama-3-8B shape" if shape == LLAMA3_8B else f"{shape['num_hidden_layers']} x {shape['hidden_size']} Llama"
    return [
        f"| forward, random {model}, {f['dtype']} (ours: scoring) | {rate(f['ours'])} | {rate(f['plain'])} "
        f"| {f['ours_vs_plain']:.3f} | >= 1 | {samples} | {f['device']} | {f['date']} |",
        f"| forward: baseline and the middle block's removal step-wide vs each alone (states on {f['kept_on']}) "
        f"| | | {f['stepwide_speedup_baseline_and_middle_block']:.2f}x | | {samples} | {f['device']} | {f['date']} |",
    ]


def _scoring_row(key: str, r: dict) -> str:
    paths = r["paths"]

    def rate(p):
        mfu = f", MFU {p['mfu']:.1%} ({p['matmul_fraction']:.0%} of matmul)" if p.get("mfu") is not None else ""
        return f"{p['tokens_per_s']:,.0f} tok/s{mfu}, compiling {p['compile_seconds']:.0f} s"

    model = "random Llama-3-8B shape, bf16" if key == "gpu_scoring" else f"{r['model']}, {r['dtype']}"
    return (
        f"| scoring ({model}): compiled + flex_attention packed rows / compiled / eager "
        f"| {rate(paths['compiled_flex'])} / {rate(paths['compiled'])} | {rate(paths['eager'])} "
        f"| {r['total_speedup']:.2f}x (compiled {r['compiled_speedup']:.2f}x, flex {r['flex_speedup']:.2f}x; "
        f"acc identical: {'yes' if r['acc_equal'] else 'NO'}, max ll diff "
        f"{max(p['max_abs_ll_diff'] for p in paths.values()):.1g}) | 60% MFU on GPU, identical "
        f"| {_samples(r)} | {r['device']} | {r['date']} |"
    )
