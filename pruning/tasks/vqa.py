"""VQA-style tasks for vision-language models: an image, a question, reference answers.

Local layout: `<data_dir>/<task>/<split>.jsonl`, one record per line,

    {"image": "images/17.png", "question": "How many circles?", "answers": ["3"]}

with the image path relative to the task folder. Multiple-choice records add `"choices"`
(the first answer must be one of them); captioning records list the reference captions as
`answers` and may leave out `question`. An optional `"type"` (the same on every record)
overrides the task's type. Without a local file, tasks with a hub copy are read with `datasets`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pruning.tasks import Task, TaskError
from pruning.tasks.harness import DATA_DIR_ENV, jsonl_records, local_file

KIND = "generation"


@dataclass(frozen=True)
class Hub:
    """Where a task lives on the Hugging Face hub: dataset, config, and our split -> its split."""

    path: str
    config: str | None
    splits: dict[str, str]


@dataclass(frozen=True)
class Spec:
    """A known task: its official metric, its type (for grouping drops) and its hub copy."""

    metric: str
    task_type: str
    hub: Hub | None = None


TASKS = {
    "vqav2": Spec("vqa_acc", "vqa", Hub("lmms-lab/VQAv2", None, {"validation": "validation"})),
    "okvqa": Spec("vqa_acc", "vqa", Hub("lmms-lab/OK-VQA", None, {"validation": "val2014"})),
    "textvqa": Spec("vqa_acc", "scene_text", Hub("lmms-lab/textvqa", None, {"train": "train", "validation": "validation"})),
    "st_vqa": Spec("anls", "scene_text"),
    "docvqa": Spec("anls", "document", Hub("lmms-lab/DocVQA", "DocVQA", {"validation": "validation"})),
    "tallyqa": Spec("exact_match", "counting"),
    "scienceqa_img": Spec(
        "mc_acc", "multiple_choice", Hub("lmms-lab/ScienceQA", "ScienceQA-IMG", {"train": "train", "validation": "validation"})
    ),
    "mmmu": Spec("mc_acc", "multiple_choice"),
    "coco_captions": Spec("cider", "captioning", Hub("lmms-lab/COCO-Caption2017", None, {"validation": "val"})),
}


@dataclass(frozen=True)
class VQAExample:
    """One question about one image. `image` names it (a path relative to the task folder, or
    `#<row>` of a hub dataset); `load()` returns it as an RGB PIL image."""

    doc_id: int
    image: str
    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    gold: int = -1  # index of the right choice (multiple choice)
    loader: Callable = field(default=None, repr=False, compare=False)

    def load(self):
        return self.loader().convert("RGB")


def spec_of(name: str) -> Spec:
    """The registry entry of task `name`."""
    if name not in TASKS:
        raise TaskError(f"unknown VQA task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def is_vqa(name: str, split: str, data_dir: str | None) -> bool:
    """Whether `name` is a VQA task: a known one, or a local file whose records have an image."""
    if name in TASKS:
        return True
    path = local_file(name, split, data_dir)
    if path is None:
        return False
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    try:
        return first.startswith("{") and "image" in json.loads(first)
    except json.JSONDecodeError:
        return False


def load(name: str, split: str, data_dir: str | None = None) -> Task:
    """Task `name` on `split`, from the local JSONL file when there is one, else from the hub."""
    spec = spec_of(name)
    path = local_file(name, split, data_dir)
    if path is not None:
        records, source = _read_jsonl(name, path), f"jsonl:{path}"
    else:
        records, source = _hub_records(name, spec, split), f"hub:{spec.hub.path}"
    examples = [_example(name, spec.metric, i, r) for i, r in enumerate(records)]
    types = {r["type"] for r in records if "type" in r}
    if len(types) > 1:
        raise TaskError(f"task {name!r}: records have several types {sorted(types)}; allowed: one type per task")
    return Task(name, split, KIND, examples, source=source, task_type=types.pop() if types else spec.task_type)


def _read_jsonl(name: str, path: Path) -> list[dict]:
    records = []
    for line_no, record in jsonl_records(path):
        if not isinstance(record.get("image"), str):
            raise TaskError(f'{path}:{line_no}: missing "image" (a path relative to {path.parent})')
        image = path.parent / record["image"]
        if not image.is_file():
            raise TaskError(f"task {name!r}: image file not found: {image} ({path.name} line {line_no})")
        records.append({**record, "loader": partial(_open_image, image), "where": f"{path}:{line_no}"})
    return records


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def _hub_records(name: str, spec: Spec, split: str) -> list[dict]:
    """Records of a hub dataset in the local layout; images are read from the dataset on demand."""
    hint = f"put {split}.jsonl and its images under <data_dir>/{name}/ or set {DATA_DIR_ENV}"
    if spec.hub is None or split not in spec.hub.splits:
        raise TaskError(f"task {name!r} has no {split} split on the hub; {hint}")
    try:
        from datasets import load_dataset

        dataset = load_dataset(spec.hub.path, spec.hub.config, split=spec.hub.splits[split])
    except Exception as err:  # datasets raises many kinds when the hub is unreachable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskError(f"cannot load task {name!r} ({split}) from {spec.hub.path}: {first}; {hint}") from None
    rows = dataset.remove_columns("image").to_list()
    return [
        {**_hub_record(row), "image": f"#{i}", "loader": partial(_hub_image, dataset, i), "where": f"{spec.hub.path} row {i}"}
        for i, row in enumerate(rows)
    ]


def _hub_image(dataset, row: int):
    return dataset[row]["image"]


def _hub_record(row: dict) -> dict:
    """The local record layout from the hub layouts: answers as strings, dicts ({"answer": ...},
    VQA v2) or the index of the right choice (ScienceQA); captions in `answer`."""
    answers = row.get("answers", row.get("answer"))
    choices = list(row.get("choices") or [])
    if isinstance(answers, int) and choices:
        answers = [choices[answers]]
    elif isinstance(answers, str):
        answers = [answers]
    else:
        answers = [a["answer"] if isinstance(a, dict) else a for a in answers or []]
    record = {"question": row.get("question") or "", "answers": answers}
    if choices:
        record["choices"] = choices
    return record


def _example(name: str, metric: str, doc_id: int, record: dict) -> VQAExample:
    where = record["where"]
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise TaskError(f'{where}: "answers" must be a non-empty list of strings, got {answers!r}')
    question = record.get("question", "")
    if metric != "cider" and not (isinstance(question, str) and question.strip()):
        raise TaskError(f'{where}: task {name!r} needs a "question"')
    choices = tuple(record.get("choices") or ())
    gold = -1
    if metric == "mc_acc":
        if answers[0] not in choices:
            raise TaskError(f"{where}: answer {answers[0]!r} is not one of the choices {list(choices)}")
        gold = choices.index(answers[0])
    return VQAExample(doc_id, record["image"], question, tuple(answers), choices, gold, record["loader"])
