"""Benchmark part 2: our multiple-choice scorer against lm-eval-harness's HF model class on the same requests."""

from __future__ import annotations

import logging

import numpy as np

from benchmarks.common import MC_TASKS, _timed, _warm_up
from pruning.evaluate import Evaluator
from pruning.models import LoadedModel
from pruning.tasks import load_task
from pruning.tasks.harness import build_lm_eval_task


def bench_mc(loaded: LoadedModel, n: int, folder: str, batch_size: int, repeats: int) -> dict:
    """Our scorer against lm-eval's HF model class on the same requests, back to back.

    lm-eval's side is `HFLM.loglikelihood` on the requests its task builds (tokenizing, batching,
    scoring) with acc/acc_norm from the task's own `process_results`; ours is `Evaluator`
    (tokenizing, packing, scoring, metrics). Task loading is outside both timings.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    per_task, turn = {}, 0
    for name in MC_TASKS:
        task = load_task(name, "validation", n, seed=0, data_dir=folder)
        lm_task, docs = build_lm_eval_task(name, "validation", folder)
        requests = [
            Instance("loglikelihood", docs[ex.doc_id], req, j, (name, ex.doc_id, 1))
            for ex in task.examples
            for j, req in enumerate(ex.requests)
        ]
        if not per_task:
            _warm_up(loaded, task, batch_size)
            lm.loglikelihood(requests[:4], disable_tqdm=True)
        runs = {
            "ours": lambda task=task, name=name: Evaluator(loaded, [task], batch_size).evaluate(())[name],
            "lm_eval": lambda requests=requests: lm.loglikelihood(requests, disable_tqdm=True),
        }
        seconds, result = {"ours": 0.0, "lm_eval": 0.0}, {}
        for _ in range(repeats):
            for key in ("ours", "lm_eval") if turn % 2 == 0 else ("lm_eval", "ours"):
                result[key], spent = _timed(runs[key])
                seconds[key] += spent
            turn += 1
        ours, theirs, start = result["ours"], [], 0
        for ex in task.examples:
            theirs.append(lm_task.process_results(docs[ex.doc_id], result["lm_eval"][start : start + len(ex.requests)]))
            start += len(ex.requests)
        metrics = {m: [int(doc[m]) for doc in theirs] for m in ("acc", "acc_norm")}
        per_task[name] = {
            "n": len(task.examples),
            "requests": len(requests),
            "seconds_ours": seconds["ours"],
            "seconds_lm_eval": seconds["lm_eval"],
            "acc": ours.metrics["acc"],
            "acc_norm": ours.metrics["acc_norm"],
            "acc_lm_eval": float(np.mean(metrics["acc"])),
            "acc_norm_lm_eval": float(np.mean(metrics["acc_norm"])),
            "identical": all(metrics[m] == ours.per_example[m] for m in metrics),
        }
    total_ours = sum(t["seconds_ours"] for t in per_task.values())
    total_theirs = sum(t["seconds_lm_eval"] for t in per_task.values())
    return {
        "tasks": per_task,
        "repeats": repeats,
        "seconds_ours": total_ours,
        "seconds_lm_eval": total_theirs,
        "speedup": total_theirs / total_ours,
        "acc_equal": all(t["identical"] for t in per_task.values()),
    }
