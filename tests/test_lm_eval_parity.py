"""Our scorer against lm-eval's own simple_evaluate with its HF model class, same examples."""

import json
from pathlib import Path

import pytest

from pruning.evaluate import Evaluator
from pruning.tasks import builtin, load_task
from pruning.tasks.harness import build_lm_eval_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
N = 100  # examples per task: per-example identity over 100 is the check; 200 doubled the suite's slowest test


def _write_layouts(folder: Path) -> None:
    """piqa and arc_easy JSONL in the Hugging Face layouts, made from the builtin cloze items."""
    items = builtin.cloze_items("train")[:N]
    (folder / "piqa").mkdir()
    (folder / "arc_easy").mkdir()
    with open(folder / "piqa" / "validation.jsonl", "w") as f:
        for ex in items:
            (ctx, a), (_, b) = ex.requests[ex.gold], ex.requests[(ex.gold + 1) % 4]
            label = ex.doc_id % 2
            sols = (a, b) if label == 0 else (b, a)
            f.write(json.dumps({"goal": ctx, "sol1": sols[0].strip(), "sol2": sols[1].strip(), "label": label}) + "\n")
    with open(folder / "arc_easy" / "validation.jsonl", "w") as f:
        for ex in items:
            choices = [c.strip() for _, c in ex.requests]
            f.write(
                json.dumps(
                    {
                        "id": str(ex.doc_id),
                        "question": ex.requests[0][0][-120:],
                        "choices": {"text": choices, "label": list("ABCD")},
                        "answerKey": "ABCD"[ex.gold],
                    }
                )
                + "\n"
            )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if all((SHARED / t / "validation.jsonl").is_file() for t in ("piqa", "arc_easy")):
        return str(SHARED)
    folder = tmp_path_factory.mktemp("layouts")
    _write_layouts(folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["piqa", "arc_easy"])
def test_acc_and_acc_norm_equal_lm_eval(name, data_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from pruning.models import load_model

    loaded = load_model("default")
    task = load_task(name, "validation", N, seed=0, data_dir=data_dir)
    assert len(task.examples) == N
    ours = Evaluator(loaded, [task], batch_size=8).evaluate(())[name]

    lm_task, docs = build_lm_eval_task(name, "validation", data_dir)
    keep = [ex.doc_id for ex in task.examples]
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=8)
    out = simple_evaluate(model=lm, tasks=[lm_task], samples={name: keep}, log_samples=True)
    theirs = out["results"][name]
    assert ours.metrics["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
    assert ours.metrics["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
    per_doc = {s["doc_id"]: s for s in out["samples"][name]}
    assert sorted(per_doc) == keep
    assert [int(per_doc[d]["acc"]) for d in keep] == ours.per_example["acc"]


@pytest.mark.slow
def test_pruned_model_step_wide_with_shared_context_equals_lm_eval(data_dir):
    """A removed block, scored from kept activations with packed choices, against lm-eval run on
    the pruned model: the same log-likelihoods (float tolerance) and the same acc/acc_norm per doc."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from pruning.models import blocks_removed, load_model

    loaded = load_model("default")
    name, removed, n = "arc_easy", (12,), 60
    task = load_task(name, "validation", n, seed=1, data_dir=data_dir)
    evaluator = Evaluator(loaded, [task], batch_size=8)
    assert all(c.prepared.shared_context for c in evaluator.chunks)
    ours = evaluator.evaluate_many([(), removed])[removed].scores[name]  # from the kept state below block 12

    lm_task, _ = build_lm_eval_task(name, "validation", data_dir)
    keep = [ex.doc_id for ex in task.examples]
    with blocks_removed(loaded, removed):
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=8)
        out = simple_evaluate(model=lm, tasks=[lm_task], samples={name: keep}, log_samples=True, bootstrap_iters=0)
    per_doc = {s["doc_id"]: s for s in out["samples"][name]}
    theirs = [[float(r[0]) for r in per_doc[d]["filtered_resps"]] for d in keep]
    diff = max(abs(a - b) for x, y in zip(ours.per_example["loglikelihoods"], theirs) for a, b in zip(x, y))
    assert diff < 1e-4
    assert [int(per_doc[d]["acc"]) for d in keep] == ours.per_example["acc"]
    assert [int(per_doc[d]["acc_norm"]) for d in keep] == ours.per_example["acc_norm"]
    assert ours.metrics["acc"] == pytest.approx(out["results"][name]["acc,none"], abs=1e-12)


def _wiki_dir(tmp_path_factory) -> str:
    """`../shared/data` when it has WikiText-2, else generated pages in its layout (`{"page": ...}`)."""
    if (SHARED / "wikitext2" / "validation.jsonl").is_file():
        return str(SHARED)
    import random

    rng = random.Random(0)
    words = [w for ex in builtin.passages("validation")[:50] for w in ex.text.split()]
    folder = tmp_path_factory.mktemp("wikitext")
    (folder / "wikitext2").mkdir()
    with open(folder / "wikitext2" / "validation.jsonl", "w") as f:
        for _ in range(PAGES):
            lines = [" = " + " ".join(rng.sample(words, 3)) + " = ", " "]
            lines += [" " + " @-@ ".join(" ".join(rng.sample(words, 12)) for _ in range(3)) + " , end . " for _ in range(6)]
            f.write(json.dumps({"page": "\n".join(lines) + "\n"}) + "\n")
    return str(folder)


PAGES = 1  # the first page of WikiText-2's test split (about 1,300 tokens): CPU-sized; several pages: test_conventions
PPL_WINDOW = 512  # several windows per page, as on long pages with a short-context model


@pytest.mark.slow
def test_perplexity_equals_lm_eval_metric_by_metric(tmp_path_factory):
    """The first WikiText-2 pages (`sample=first`, lm-eval's `--limit`): each page's log-likelihood and
    word_perplexity, byte_perplexity, bits_per_byte against lm-eval's own simple_evaluate on the default model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from pruning.models import load_model

    folder = _wiki_dir(tmp_path_factory)
    loaded = load_model("default")
    task = load_task("wikitext", "validation", PAGES, seed=0, data_dir=folder, sample_how="first")
    assert [ex.doc_id for ex in task.examples] == list(range(PAGES))
    ours = Evaluator(loaded, [task], batch_size=4, max_length=PPL_WINDOW).evaluate(())["wikitext"]

    lm_task, _ = build_lm_eval_task("wikitext", "validation", folder)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=4, max_length=PPL_WINDOW)
    out = simple_evaluate(model=lm, tasks=[lm_task], limit=PAGES, log_samples=True, bootstrap_iters=0)
    theirs = out["results"]["wikitext"]
    per_doc = {s["doc_id"]: s for s in out["samples"]["wikitext"]}
    assert sorted(per_doc) == list(range(PAGES))
    their_nll = [-float(per_doc[d]["resps"][0][0]) for d in range(PAGES)]
    assert ours.per_example["nll"] == pytest.approx(their_nll, rel=1e-5)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours.metrics[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-5), metric
