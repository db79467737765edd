"""lm-eval's conventions: perplexity metrics counted as its tasks count them, rolling tokenization
with a BOS-adding tokenizer, which metric each task defines and reports, `sample=first`.

Fast: tiny random models, generated pages and examples written in the Hugging Face layouts."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import tiny_lm

from contract import names
from pruning.encoding import _pairs_of, prefix_token_id
from pruning.evaluate import SCORER_VERSION, Evaluator
from pruning.metrics import task_score
from pruning.models import LoadedModel, find_blocks_path
from pruning.tasks import METRICS, Document, Task, TaskError, load_task, sample
from pruning.tasks.harness import build_lm_eval_task
from search.configs import _metrics_from, convention_tags, headline_mean
from search.prune import PruneSettings, _task_metrics

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
WINDOW = 24  # tokens per rolling window: pages take several


def bos_tokenizer():
    """A word-level tokenizer that adds a BOS token, like Llama-2's and Gemma's: `w3` ... are ids 3 ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def tiny_llama(tokenizer) -> LoadedModel:
    model = tiny_lm("llama", 3, VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LoadedModel(model, tokenizer, "tiny-llama", "local", find_blocks_path(model))


def wiki_page(rng: random.Random) -> str:
    """A page in WikiText's raw layout: ` = Title = `, ` @-@ ` and ` , ` that lm-eval's detokenizer joins."""

    def words(n):
        return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n))

    lines = [f" = {words(2)} = ", " "]
    for _ in range(rng.randrange(2, 5)):
        parts = [words(rng.randrange(3, 12)) for _ in range(rng.randrange(2, 5))]
        lines.append(" " + " @-@ ".join(parts) + " , " + words(4) + " . ")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """Generated WikiText pages and BoolQ / WinoGrande / HellaSwag records in the hub layouts."""
    folder = tmp_path_factory.mktemp("layouts")
    rng = random.Random(0)
    records = {
        "wikitext2": [{"page": wiki_page(rng)} for _ in range(7)],
        "boolq": [{"question": f"is it {i}", "passage": f"Passage {i}.", "idx": i, "label": i % 2} for i in range(6)],
        "winogrande": [
            {"sentence": f"The cup beat the jar because _ was {i}.", "option1": "cup", "option2": "jar", "answer": str(1 + i % 2)}
            for i in range(6)
        ],
        "hellaswag": [
            {
                "ind": i,
                "activity_label": "Cooking",
                "ctx_a": f"A man cooks {i}.",
                "ctx_b": "he",
                "ctx": f"A man cooks {i}. he",
                "endings": ["eats.", "sleeps.", "runs away.", "sits."],
                "source_id": "x",
                "split": "val",
                "split_type": "indomain",
                "label": str(i % 4),
            }
            for i in range(6)
        ],
    }
    for name, rows in records.items():
        (folder / name).mkdir()
        with open(folder / name / "validation.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(folder)


def test_wikitext_counts_words_and_bytes_on_the_original_page(data_dir):
    """lm-eval's wikitext process_results counts on doc["page"], not on the detokenized text it scores."""
    task = load_task("wikitext", "validation", data_dir=data_dir)
    pages = [json.loads(line)["page"] for line in open(Path(data_dir) / "wikitext2" / "validation.jsonl")]
    lm_task, docs = build_lm_eval_task("wikitext", "validation", data_dir)
    for doc, ex, page in zip(docs, task.examples, pages):
        assert ex.text == lm_task.doc_to_target(doc) != page
        assert ex.words == len(re.split(r"\s+", page)) > len(re.split(r"\s+", ex.text))
        assert ex.bytes == len(page.encode("utf-8"))
    assert task.metrics == METRICS["perplexity"] and task.headline == "word_perplexity"


def test_rolling_windows_with_a_bos_tokenizer_are_lm_evals(data_dir):
    """The document is encoded with the tokenizer's BOS, as HFLM.tok_encode does, and cut as lm-eval cuts it."""
    from lm_eval import utils
    from lm_eval.models.huggingface import HFLM

    tokenizer = bos_tokenizer()
    loaded = tiny_llama(tokenizer)
    lm = HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=4, max_length=WINDOW)
    task = load_task("wikitext", "validation", data_dir=data_dir)
    pairs, groups = _pairs_of(task, tokenizer, WINDOW)
    assert all(len(group) > 1 for group in groups)
    for ex, group in zip(task.examples, groups):
        tokens = lm.tok_encode(ex.text)
        assert tokens[0] == tokenizer.bos_token_id == prefix_token_id(tokenizer)
        theirs = [
            utils.make_disjoint_window(w)
            for w in utils.get_rolling_token_windows(tokens, lm.prefix_token_id, WINDOW, context_len=1)
        ]
        assert [pairs[i] for i in group] == theirs
    text = tokenizer.bos_token + " " + task.examples[0].text  # already starts with BOS: not added again
    bos_doc = Task("bos", "validation", "perplexity", [Document(0, text)])
    assert _pairs_of(bos_doc, tokenizer, 10**6)[0][0][1] == lm.tok_encode(text)


def test_perplexity_equals_lm_eval_simple_evaluate_metric_by_metric(data_dir):
    """word_perplexity, byte_perplexity, bits_per_byte and each page's log-likelihood, against lm-eval's own
    simple_evaluate on the same pages, with a BOS-adding tokenizer and several windows per page."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tokenizer = bos_tokenizer()
    loaded = tiny_llama(tokenizer)
    task = load_task("wikitext", "validation", 5, seed=3, data_dir=data_dir)
    ours = Evaluator(loaded, [task], 4, max_length=WINDOW).evaluate(())["wikitext"]

    lm_task, _ = build_lm_eval_task("wikitext", "validation", data_dir)
    keep = [ex.doc_id for ex in task.examples]
    lm = HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=4, max_length=WINDOW)
    out = simple_evaluate(model=lm, tasks=[lm_task], samples={"wikitext": keep}, log_samples=True, bootstrap_iters=0)
    theirs = out["results"]["wikitext"]
    per_doc = {s["doc_id"]: s for s in out["samples"]["wikitext"]}
    their_nll = [-float(per_doc[d]["resps"][0][0]) for d in keep]
    np.testing.assert_allclose(ours.per_example["nll"], their_nll, rtol=1e-5)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours.metrics[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-5), metric
    assert ours.per_example["tokens"] == [len(tokenizer.encode(ex.text)) for ex in task.examples]  # BOS is scored


def test_acc_norm_only_where_lm_eval_defines_it_and_the_headline_metric(data_dir):
    tasks = {n: load_task(n, "validation", data_dir=data_dir) for n in ("boolq", "winogrande", "hellaswag")}
    assert tasks["boolq"].metrics == tasks["winogrande"].metrics == ("acc",)
    assert tasks["hellaswag"].metrics == ("acc", "acc_norm")
    assert {n: t.headline for n, t in tasks.items()} == {"boolq": "acc", "winogrande": "acc", "hellaswag": "acc_norm"}
    lls = [np.array([-1.0, -2.0])] * len(tasks["boolq"].examples)
    boolq = task_score(tasks["boolq"], list(range(len(lls))), lls, [1] * len(lls))
    assert set(boolq.metrics) == {"acc"} and "acc_norm" not in boolq.per_example
    builtin = load_task("pydoc_cloze", "validation", 4)  # the project's own task: acc and acc_norm
    assert builtin.metrics == ("acc", "acc_norm") and builtin.headline == "acc"
    assert convention_tags([*tasks.values(), builtin]) == {
        "headline/boolq": "acc",
        "headline/winogrande": "acc",
        "headline/hellaswag": "acc_norm",
        "headline/pydoc_cloze": "acc",
    }


def test_headline_mean_averages_each_tasks_headline_and_acc_mean_stays_acc():
    mc = [
        Task(n, "validation", "multiple_choice", [], headline=h)
        for n, h in (("boolq", "acc"), ("hellaswag", "acc_norm"), ("arc_challenge", "acc_norm"))
    ]
    ppl = Task("wikitext", "validation", "perplexity", [])
    by_task = {
        "boolq": {"acc": 0.6},
        "hellaswag": {"acc": 0.4, "acc_norm": 0.5},
        "arc_challenge": {"acc": 0.2, "acc_norm": 0.3},
        "wikitext": {"ppl": 10.0, "word_perplexity": 20.0, "byte_perplexity": 1.5, "bits_per_byte": 0.6},
    }
    assert headline_mean(by_task, mc + [ppl]) == pytest.approx((0.6 + 0.5 + 0.3) / 3)
    out = _task_metrics(by_task, mc + [ppl], "wikitext", prefix="baseline_")
    assert out["baseline_acc_mean"] == pytest.approx((0.6 + 0.4 + 0.2) / 3)
    assert out["baseline_headline_mean"] == pytest.approx((0.6 + 0.5 + 0.3) / 3)
    assert out["baseline_ppl"] == 10.0 and out["baseline_byte_perplexity_wikitext"] == 1.5
    assert "baseline_acc_norm_boolq" not in out
    assert [names.metric(m, "wikitext") for m in ppl.metrics] == [
        "ppl_wikitext",
        "word_perplexity_wikitext",
        "byte_perplexity_wikitext",
        "bits_per_byte_wikitext",
    ]


def test_runs_are_read_back_with_the_metrics_each_task_logs():
    class Run:
        class data:
            metrics = {
                "acc_boolq": 0.5,
                "acc_piqa": 0.6,
                "acc_norm_piqa": 0.7,
                "ppl_wikitext": 9.0,
                "word_perplexity_wikitext": 20.0,
                "byte_perplexity_wikitext": 1.5,
                "bits_per_byte_wikitext": 0.6,
            }

    tasks = [
        Task("boolq", "validation", "multiple_choice", [], metrics=("acc",)),
        Task("piqa", "validation", "multiple_choice", []),
        Task("wikitext", "validation", "perplexity", []),
    ]
    assert _metrics_from(Run, tasks) == {
        "boolq": {"acc": 0.5},
        "piqa": {"acc": 0.6, "acc_norm": 0.7},
        "wikitext": {"ppl": 9.0, "word_perplexity": 20.0, "byte_perplexity": 1.5, "bits_per_byte": 0.6},
    }


def test_sample_first_takes_the_first_examples_in_file_order(data_dir):
    first = load_task("hellaswag", "validation", 3, seed=5, data_dir=data_dir, sample_how="first")
    assert [ex.doc_id for ex in first.examples] == [0, 1, 2]
    seeded = load_task("hellaswag", "validation", 3, seed=5, data_dir=data_dir)
    assert [ex.doc_id for ex in seeded.examples] == sorted(random.Random(5).sample(range(6), 3))
    assert sample(list(range(10)), 4, 0, "first") == [0, 1, 2, 3] and sample(list(range(3)), 4, 0, "first") == [0, 1, 2]
    with pytest.raises(TaskError, match="unknown sample 'random'; allowed: seeded, first"):
        load_task("pydoc_cloze", "validation", 3, sample_how="random")
    with pytest.raises(TaskError, match="unknown sample"):
        PruneSettings(sample="random").check()


def test_sample_is_a_parameter_of_every_entry_point_with_the_common_parameters():
    from search.prune import parser as prune_parser
    from search.settings import sensitivity_parser

    assert sensitivity_parser().parse_args(["--sample", "first"]).sample == "first"
    assert sensitivity_parser().parse_args([]).sample == "seeded"
    assert prune_parser().parse_args(["--sample", "first"]).sample == "first"
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name in ("sensitivity", "beam_search", "prune"):
        assert entry_points[name]["parameters"]["sample"]["default"] == "seeded", name
        assert "--sample {sample}" in entry_points[name]["command"], name


def test_the_docs_state_the_conventions():
    docs = "".join((ROOT / "docs" / page).read_text() for page in ("tasks.md", "scoring.md", "contract.md"))
    for name in (
        "word_perplexity_<task>",
        "byte_perplexity_<task>",
        "bits_per_byte_<task>",
        "ppl_<task>",
        "headline_mean",
        "`sample`",
        "ppl_window",
        "headline/<task>",
        f"Scorer version: {SCORER_VERSION}",
    ):
        assert name in docs, name


def test_entry_points_log_under_their_module_name():
    """`python -m <module>` runs a module as `__main__`, a logger the logging set-up does not show
    (contract.cli.show_logs): an entry point names its logger `__spec__.name`, never `__name__`."""
    root = Path(__file__).resolve().parents[1]
    for path in [
        p for package in ("pruning", "contract", "search", "analysis", "benchmarks") for p in (root / package).rglob("*.py")
    ]:
        text = path.read_text()
        if 'if __name__ == "__main__"' in text:
            assert "getLogger(__name__)" not in text, path


def _contract_literals() -> tuple[dict[str, str], dict[str, str]]:
    """contract.names' string values, and the literal prefixes of its name builders (`importance/`)."""
    import inspect

    values = {v: k for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
    prefixes = {}
    for name, builder in inspect.getmembers(names, inspect.isfunction):
        if builder.__module__ == names.__name__:
            required = [p for p in inspect.signature(builder).parameters.values() if p.default is p.empty]
            built = builder(*["\0"] * len(required))
            prefix = built.split("\0")[0]
            if len(prefix) > 3:
                prefixes[prefix] = name
    return values, prefixes


def test_contract_names_are_never_spelled_as_literals_in_search_or_analysis():
    """A tag, metric, artifact or run-kind name of the tracking contract is written once, in
    contract/names.py: search/ and analysis/ use its constants and builders, so renaming one cannot
    leave a stale copy that writes or reads another name."""
    import ast

    values, prefixes = _contract_literals()
    coincidences = {("analysis/correlation.py", "study")}  # a key of the correlation report, not the run kind
    assert "removed_blocks" in values and "importance/" in prefixes and "baseline_" in prefixes  # the check itself works
    root, found = Path(__file__).resolve().parents[1], []
    for path in [p for package in ("search", "analysis") for p in sorted((root / package).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in values:
                if (str(path.relative_to(root)), node.value) in coincidences:
                    continue
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r} (names.{values[node.value]})")
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                start = str(node.values[0].value)
                found += [
                    f"{path.relative_to(root)}:{node.lineno} f{start!r}... (names.{builder})"
                    for prefix, builder in prefixes.items()
                    if start == prefix
                ]
    assert not found, "\n".join(found)
