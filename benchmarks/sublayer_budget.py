"""Whole blocks vs sublayers at one parameter budget, picked one-shot from a sublayer sensitivity study.

    python -m benchmarks.sublayer_budget --tracking_uri URI --run_id <sensitivity run> --data_dir DIR [--blocks 4]

From the study's mean importances (`sensitivity.json`, removal_unit=sublayer): the `blocks` least
important whole blocks, and the least important sublayers taken one at a time while their parameters
stay within those blocks'; both scored with the baseline on the study's tasks and examples. Prints
each one's units, parameters removed and accuracy per task (headline metric) as JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from contract import names, tracking
from contract.records import SensitivityReport
from pruning.evaluate import Evaluator
from pruning.families import removed_parameters
from pruning.models import load_model
from pruning.tasks import load_task, parse_task_list
from pruning.units import Unit, label, normalize
from search.configs import headline_mean


def picks(report: SensitivityReport, loaded, blocks: int) -> dict:
    """The one-shot block and sublayer configurations at the parameter budget of `blocks` blocks."""
    order = np.argsort(report.importance_mean, kind="stable")
    whole = normalize(int(b) for b in order[:blocks])
    budget = removed_parameters(loaded, whole)
    attn = np.mean(list(report.importance_attn.values()), axis=0)
    mlp = np.mean(list(report.importance_mlp.values()), axis=0)
    ranked = sorted([(v, Unit(i, "a")) for i, v in enumerate(attn)] + [(v, Unit(i, "m")) for i, v in enumerate(mlp)])
    chosen = ()
    for _, unit in ranked:
        grown = normalize((*chosen, unit))
        if removed_parameters(loaded, grown) <= budget:
            chosen = grown
    return {"blocks": whole, "sublayers": chosen}


def main(argv=None) -> None:
    """Score the one-shot picks and print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking_uri", required=True)
    parser.add_argument("--run_id", required=True)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args(argv)
    client = tracking.connect(args.tracking_uri)
    run = client.get_run(args.run_id)
    params = run.data.params
    report = SensitivityReport.from_json(tracking.load_json(client, args.run_id, names.SENSITIVITY_REPORT))
    loaded = load_model(params["model"], device=params["device"], dtype=params["dtype"])
    n = int(params["n_samples"]) or None
    tasks = [
        load_task(t, params["split"], n, int(params["seed"]), args.data_dir or None, params["sample"])
        for t in parse_task_list(params["tasks"])
    ]
    configs = {"baseline": (), **picks(report, loaded, args.blocks)}
    scores = Evaluator(loaded, tasks, int(params["batch_size"])).evaluate_many(list(configs.values()))
    out = {}
    for name, config in configs.items():
        metrics = {t: s.metrics for t, s in scores[config].scores.items()}
        out[name] = {
            "units": label(config),
            "params_removed": removed_parameters(loaded, config),
            "headline": {t.name: metrics[t.name][t.headline] for t in tasks},
            "headline_mean": headline_mean(metrics, tasks),
            "n": {t.name: len(t.examples) for t in tasks},
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
