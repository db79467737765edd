"""Vision-language models: VQA scoring against hand-computed cases, VQA tasks, block removal and
generation on a tiny random Llava, and a sensitivity + beam search study end to end."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers import runs, tiny_lm
from PIL import Image, ImageDraw

from contract import names
from pruning import vqa_metrics as m
from pruning.models import LoadedModel, ModelError, blocks_removed, find_blocks_path, load_model
from pruning.tasks import TaskError, harness, load_task
from pruning.vlm import GenerationEvaluator, render

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPES = {"circle": "ellipse", "square": "rectangle"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# --- scoring: hand-computed cases of the official definitions ---------------------------------


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matching, expected):
    # a matching human answer leaves matching-1 in its subset of 9, another leaves matching:
    # e.g. 2 matching -> (2 * min(1/3, 1) + 8 * min(2/3, 1)) / 10 = 0.6
    answers = ["two"] * min(matching, 1) + ["2"] * max(matching - 1, 0) + ["3"] * (10 - matching)
    assert m.vqa_accuracy("2", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two dogs.", "2 dogs"),
        ("the Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes!", "yes"),
        ("red-white", "red white"),
        ("red - white", "red white"),
        ("  Ten\n", "10"),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert m.normalize_answer(raw) == normalised


def test_exact_match_uses_the_normalisation():
    assert m.exact_match("Three", ["3"]) == 1.0
    assert m.exact_match("3 circles", ["3"]) == 0.0
    assert m.exact_match("4", ["3", "four"]) == 1.0


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Denver Broncos", ["Denver Broncos", "Denver R. Broncos"], 1.0),
        ("12/15/89", ["12/15/88"], 1 - 1 / 8),  # one substitution in 8 characters
        ("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"], 1.0),  # lowercased
        ("  dr.   lobo ", ["Dr. Lobo"], 1.0),  # stripped, spaces collapsed
        ("abcxy", ["abcde"], 1 - 2 / 5),  # NL 0.4 < 0.5 kept
        ("abxy", ["abcd"], 0.0),  # NL 0.5 is not below tau: 0
        ("xyz", ["abc", "xbc"], 0.0),  # NL 1 and 2/3
        ("xbcd", ["abcd", "xyzw"], 0.75),  # max over the answers
    ],
)
def test_anls(prediction, answers, expected):
    assert m.anls(prediction, answers) == pytest.approx(expected)


def test_anls_counts_character_edits():
    # the distances the hand-written Levenshtein gave before rapidfuzz replaced it: kitten/sitting 3,
    # 日本語/日本 1 (characters, not bytes), two empty strings 0, "a"/"" 1
    assert m.anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)
    assert m.anls("日本語", ["日本"]) == pytest.approx(1 - 1 / 3)
    assert m.anls("", [""]) == 1.0 and m.anls("a", [""]) == 0.0


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", 1),
        ("B.", 1),
        ("(C) square", 2),
        ("C: square", 2),
        ("circle", 0),
        ("A circle", 0),
        ("Triangle", 1),
        ("E", -1),
        ("hexagon", -1),
        ("", -1),
    ],
)
def test_choice_index(prediction, expected):
    assert m.choice_index(prediction, ["circle", "triangle", "square"]) == expected


def test_cider_d_identical_captions():
    # document frequencies are all 1: every n-gram weighs log(2); unigram and bigram cosines are 1,
    # there are no 3- and 4-grams, so the score is 10 * (1 + 1 + 0 + 0) / 4 = 5
    score, per = m.cider_d(["red circle", "blue square"], [["red circle"], ["Blue square."]])
    assert per == pytest.approx([5.0, 5.0]) and score == pytest.approx(5.0)


def test_cider_d_length_penalty():
    # image 1: unigram cosine 2 / (sqrt 2 sqrt 3), bigram cosine 1 / sqrt 2, one bigram shorter
    score, per = m.cider_d(["red circle", "blue square"], [["red circle left"], ["blue square"]])
    first = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per == pytest.approx([first, 5.0]) and score == pytest.approx((first + 5.0) / 2)


def test_cider_d_idf_and_clipping():
    # 3 images; "circle" is in the references of two of them: weight log 3 - log 2 = w;
    # image 1 repeats it: the candidate weight 2w is clipped at the reference's w
    w, big = math.log(1.5), math.log(3)
    penalty = math.exp(-1 / 72)
    score, per = m.cider_d(["circle circle", "square", "circle"], [["circle"], ["square"], ["circle star"]])
    expected = [10 * (w * w / (2 * w * w)) / 4 * penalty, 10 * 1 / 4, 10 * (w / math.hypot(w, big)) / 4 * penalty]
    assert per == pytest.approx(expected) and score == pytest.approx(sum(expected) / 3)


def test_cider_d_averages_over_references():
    _, both = m.cider_d(["red circle", "blue square"], [["red circle", "green star"], ["blue square"]])
    _, one = m.cider_d(["red circle", "blue square"], [["red circle"], ["blue square"]])
    assert both[0] < one[0] and both[0] > 0


# --- fixtures: a tiny random Llava and generated images ---------------------------------------


def draw(shape: str, count: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    pen = ImageDraw.Draw(image)
    for c in range(count):
        x, y = 2 + 15 * c, rng.randint(2, 48)
        getattr(pen, SHAPES[shape])((x, y, x + 12, y + 12), fill="red")
    return image


def write_task(folder: Path, records: list[dict], images: list[Image.Image]) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / "images" / f"{i}.png")
    with open(folder / "validation.jsonl", "w") as f:
        f.writelines(json.dumps({"image": f"images/{i}.png", **r}) + "\n" for i, r in enumerate(records))


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from pruning.models import converted_gguf, default_model_path

    path = tmp_path_factory.mktemp("tiny_llava")
    tokenizer = AutoTokenizer.from_pretrained(converted_gguf(default_model_path()))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_seq_length=16, image_token_index=tokenizer.convert_tokens_to_ids("<image>")
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vlm(vlm_dir):
    return load_model(str(vlm_dir), device="cpu")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, vlm):
    """Counting (tallyqa), shape multiple choice (scienceqa_img) and captions (coco_captions).

    A random model cannot count, so each counting item also accepts the unpruned model's own
    answer: the baseline scores 1 and removing a block that changes the answer costs points.
    """
    root = tmp_path_factory.mktemp("vqa_data")
    rng = random.Random(0)
    counts = [rng.randint(1, 4) for _ in range(8)]
    images = [draw("circle", c, rng) for c in counts]
    write_task(root / "tallyqa", [{"question": "How many circles?", "answers": [str(c)]} for c in counts], images)
    baseline = GenerationEvaluator(vlm, [load_task("tallyqa", data_dir=str(root))], 8)
    answers = baseline.generate(baseline.prepared[0])
    write_task(
        root / "tallyqa", [{"question": "How many circles?", "answers": [str(c), a]} for c, a in zip(counts, answers)], images
    )
    shapes = [rng.choice(sorted(SHAPES)) for _ in range(4)]
    write_task(
        root / "scienceqa_img",
        [{"question": "Which shape is drawn?", "choices": ["circle", "square"], "answers": [s]} for s in shapes],
        [draw(s, 2, rng) for s in shapes],
    )
    captions = [{"answers": [f"{c} red circles", f"red circles, {c} of them"]} for c in counts[:4]]
    write_task(root / "coco_captions", captions, images[:4])
    return root


# --- tasks ------------------------------------------------------------------------------------


def test_local_vqa_tasks(data_dir):
    task = load_task("tallyqa", "validation", 4, seed=1, data_dir=str(data_dir))
    assert (task.kind, task.task_type, len(task.examples)) == ("generation", "counting", 4)
    first = task.examples[0]
    assert first.question == "How many circles?" and first.image.startswith("images/")
    assert first.load().mode == "RGB" and first.load().size == (64, 64)
    assert task.examples == load_task("tallyqa", "validation", 4, seed=1, data_dir=str(data_dir)).examples
    choice = load_task("scienceqa_img", data_dir=str(data_dir))
    assert choice.task_type == "multiple_choice"
    assert all(ex.choices[ex.gold] == ex.answers[0] for ex in choice.examples)
    assert load_task("coco_captions", data_dir=str(data_dir)).examples[0].question == ""


def test_record_type_overrides_the_registry(tmp_path):
    write_task(tmp_path / "docvqa", [{"question": "Title?", "answers": ["x"], "type": "scene_text"}], [Image.new("RGB", (8, 8))])
    assert load_task("docvqa", data_dir=str(tmp_path)).task_type == "scene_text"


def test_vqa_task_errors(tmp_path):
    write_task(tmp_path / "shapes", [{"question": "How many?", "answers": ["1"]}], [Image.new("RGB", (8, 8))])
    with pytest.raises(TaskError, match=r"unknown VQA task 'shapes'; allowed: vqav2, okvqa, textvqa, st_vqa, docvqa"):
        load_task("shapes", data_dir=str(tmp_path))
    write_task(tmp_path / "tallyqa", [{"question": "How many?", "answers": ["1"]}], [])
    with pytest.raises(TaskError, match=r"task 'tallyqa': image file not found: .*/images/0.png \(validation.jsonl"):
        load_task("tallyqa", data_dir=str(tmp_path))
    write_task(tmp_path / "mmmu", [{"question": "Which?", "choices": ["a", "b"], "answers": ["c"]}], [Image.new("RGB", (8, 8))])
    with pytest.raises(TaskError, match=r"answer 'c' is not one of the choices \['a', 'b'\]"):
        load_task("mmmu", data_dir=str(tmp_path))
    write_task(tmp_path / "okvqa", [{"question": "Which?", "answers": []}], [Image.new("RGB", (8, 8))])
    with pytest.raises(TaskError, match=r"\"answers\" must be a non-empty list of strings, got \[\]"):
        load_task("okvqa", data_dir=str(tmp_path))
    with pytest.raises(TaskError, match=r"task 'st_vqa' has no validation split on the hub; put validation.jsonl"):
        load_task("st_vqa", data_dir=str(tmp_path))


def test_hub_layouts_are_read_with_datasets(monkeypatch):
    import datasets

    rows = {
        "lmms-lab/VQAv2": {
            "question": ["How many?"],
            "image": [Image.new("RGB", (8, 8), "red")],
            "answers": [[{"answer": "two", "answer_id": i} for i in range(10)]],
        },
        "lmms-lab/ScienceQA": {
            "question": ["Which?"],
            "image": [Image.new("RGB", (8, 8))],
            "choices": [["circle", "square"]],
            "answer": [1],
        },
    }
    requested = []

    def fake_load_dataset(path, config=None, split=None):
        requested.append((path, config, split))
        return datasets.Dataset.from_dict(rows[path]).cast_column("image", datasets.Image())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv(harness.DATA_DIR_ENV, raising=False)
    task = load_task("vqav2")
    assert task.source == "hub:lmms-lab/VQAv2" and task.examples[0].answers == ("two",) * 10
    assert task.examples[0].image == "#0" and task.examples[0].load().getpixel((0, 0)) == (255, 0, 0)
    choice = load_task("scienceqa_img", "train").examples[0]
    assert (choice.choices, choice.gold) == (("circle", "square"), 1)
    assert requested == [("lmms-lab/VQAv2", None, "validation"), ("lmms-lab/ScienceQA", "ScienceQA-IMG", "train")]


# --- the model: loading, block removal, generation --------------------------------------------


def test_vlm_loads_with_processor_and_language_blocks(vlm):
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    assert vlm.processor is not None and vlm.tokenizer is vlm.processor.tokenizer
    assert (vlm.blocks_path, vlm.num_blocks) == ("model.language_model.layers", 4)


def _inputs(vlm, n=2):
    rng = random.Random(1)
    text = render(vlm.processor, "How many circles?")
    return vlm.processor(images=[draw("circle", i + 1, rng) for i in range(n)], text=[text] * n, return_tensors="pt")


def test_vlm_block_removal_is_exact_and_reversible(vlm):
    inputs = _inputs(vlm)
    state = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with blocks_removed(vlm, [1, 2]):
            assert vlm.num_blocks == 2 and vlm.model.config.text_config.num_hidden_layers == 2
            pruned = vlm.model(**inputs, use_cache=False).logits
        after = vlm.model(**inputs).logits
    assert not torch.allclose(pruned, before)
    assert torch.equal(after, before) and vlm.num_blocks == 4
    assert all(torch.equal(v, state[k]) for k, v in vlm.model.state_dict().items())


def test_vlm_generates_with_blocks_removed(vlm):
    inputs = _inputs(vlm, 1)
    with blocks_removed(vlm, [0, 2]):
        cached = vlm.model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = vlm.model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        assert [b.self_attn.layer_idx for b in vlm.blocks] == [0, 1]
    assert torch.equal(cached, uncached)
    assert [b.self_attn.layer_idx for b in vlm.blocks] == [0, 1, 2, 3]


def test_vlm_language_sublayers_removed(vlm):
    from pruning.families import units_removed

    inputs = _inputs(vlm, 1)
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with units_removed(vlm, ["a0", "m1", "b2"]):
            assert vlm.num_blocks == 3
            pruned = vlm.model(**inputs, use_cache=False).logits
            cached = vlm.model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
            uncached = vlm.model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(vlm.model(**inputs).logits, before)
    assert not torch.allclose(pruned, before) and torch.equal(cached, uncached)


def test_generation_evaluator(vlm, data_dir):
    tasks = [load_task(name, data_dir=str(data_dir)) for name in ("tallyqa", "scienceqa_img", "coco_captions")]
    evaluator = GenerationEvaluator(vlm, tasks, batch_size=3)
    assert [p.task for p in evaluator.prepared] == tasks
    assert [p.metric for p in evaluator.prepared] == ["exact_match", "mc_acc", "cider"]
    assert "A. circle\nB. square\n" in evaluator.prepared[1].prompts[0]
    base = evaluator.evaluate(())
    assert base["tallyqa"].metrics == {"score": 1.0, "exact_match": 1.0}  # the answers include its own
    for score in base.values():
        assert score.kind == "generation" and set(score.per_example) == {"doc_id", "prediction", "score"}
        assert score.metrics["score"] == pytest.approx(sum(score.per_example["score"]) / score.n)
    pruned = evaluator.evaluate((1,))
    assert pruned["tallyqa"].per_example["prediction"] != base["tallyqa"].per_example["prediction"]
    assert pruned["tallyqa"].metrics["score"] < 1.0
    assert evaluator.evaluate(())["tallyqa"].per_example == base["tallyqa"].per_example


def test_vqa_needs_a_vision_model_and_one_kind_of_task(vlm, data_dir):
    lm = tiny_lm("llama", 2, 64)
    text_model = LoadedModel(lm, None, "tiny-llama", "local", find_blocks_path(lm))
    counting = load_task("tallyqa", data_dir=str(data_dir))
    with pytest.raises(
        ModelError,
        match=r"model 'tiny-llama' has no vision tower .*VQA tasks \(tallyqa\) need an "
        r"image-text-to-text model",
    ):
        GenerationEvaluator(text_model, [counting])
    with pytest.raises(TaskError, match=r"tasks mix text tasks \(pydoc_cloze\) with VQA tasks \(tallyqa\)"):
        GenerationEvaluator(vlm, [load_task("pydoc_cloze", n_samples=2), counting])


# --- studies end to end -----------------------------------------------------------------------


def test_sensitivity_and_beam_search_on_a_vlm(vlm_dir, data_dir, sqlite_store, tmp_path, monkeypatch):
    from search import beam, sensitivity

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    uri, client = sqlite_store
    common = [
        "--model",
        str(vlm_dir),
        "--tasks",
        "tallyqa",
        "--data_dir",
        str(data_dir),
        "--n_samples",
        "4",
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--tracking_uri",
        uri,
    ]
    sensitivity.main(common)  # what `python -m search.sensitivity ...` runs
    (parent,) = runs(client, "sensitivity")
    assert parent.data.tags["task_type/tallyqa"] == "counting"
    assert parent.data.metrics["baseline_score_tallyqa"] == 1.0
    history = sorted(client.get_metric_history(parent.info.run_id, "importance/tallyqa"), key=lambda x: x.step)
    assert [h.step for h in history] == [0, 1, 2, 3]
    children = {r.data.tags["removed_blocks"]: r for r in runs(client, "config")}
    assert set(children) == {"", "0", "1", "2", "3"}
    for h in history:
        child = children[str(h.step)]
        assert child.data.params["generation_scorer"] == "1"
        assert h.value == pytest.approx(1.0 - child.data.metrics["score_tallyqa"])
        assert child.data.metrics["exact_match_tallyqa"] == child.data.metrics["score_tallyqa"]
    assert max(h.value for h in history) > 0

    beam.main([*common, "--max_removed", "2", "--beam_width", "1", "--criterion", "mean", "--retries", "0"])
    (parent,) = runs(client, "beam_search")
    assert parent.data.metrics["configs_reused"] == 5  # the baseline and the 4 single removals
    results = json.loads(Path(client.download_artifacts(parent.info.run_id, names.BEAM_RESULTS, str(tmp_path))).read_text())
    assert [len(e["removed_blocks"]) for e in results["recommendations"]] == [1, 2]
    assert results["recommendations"][0]["mean_drop"] == min(h.value for h in history)
