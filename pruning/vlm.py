"""Generation-based scoring of vision-language models on VQA-style tasks, with any blocks or sublayers removed.

Each example becomes one user turn (the image, then the task's prompt) rendered with the
processor's chat template; answers are decoded greedily, `max_new_tokens` per metric, in
batches (left-padded). The first line of the generated text is scored with the task's
official metric (pruning.vqa_metrics). A task's `score` is that metric's mean (CIDEr-D: the
corpus score, x10 as COCO reports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning import vqa_metrics
from pruning.evaluate import ConfigScores
from pruning.families import units_removed
from pruning.metrics import TaskScore
from pruning.models import ModelError
from pruning.tasks import Task, TaskError
from pruning.tasks.vqa import KIND, VQAExample, spec_of

SCORER_VERSION = "1"  # part of every configuration hash of a VQA study: bump when scores would change
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
MAX_NEW_TOKENS = {"vqa_acc": 16, "exact_match": 16, "anls": 32, "mc_acc": 8, "cider": 64}
ANSWER_METRICS = {"vqa_acc": vqa_metrics.vqa_accuracy, "anls": vqa_metrics.anls, "exact_match": vqa_metrics.exact_match}


def prompt_of(example: VQAExample, metric: str) -> str:
    """The instruction that follows the image: the question with the answer format the metric expects."""
    if metric == "cider":
        return CAPTION_PROMPT
    if metric == "mc_acc":
        options = "\n".join(f"{vqa_metrics.LETTERS[i]}. {c}" for i, c in enumerate(example.choices))
        return f"{example.question}\n{options}\n{CHOICE_ANSWER}"
    return f"{example.question}\n{SHORT_ANSWER}"


def render(processor, prompt: str) -> str:
    """The model's input text for one image and `prompt`: the processor's chat template with a
    generation prompt, or the image token and the prompt when the processor has no template."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{getattr(processor, 'image_token', '')}\n{prompt}"


@dataclass
class PreparedGeneration:
    """A VQA task with its metric, rendered prompts and generation length."""

    task: Task
    metric: str
    prompts: list[str]
    max_new_tokens: int


def score_predictions(metric: str, examples: list[VQAExample], predictions: list[str]) -> tuple[float, list[float]]:
    """(task score, per-example scores) of the predictions under `metric`."""
    if metric == "cider":
        return vqa_metrics.cider_d(predictions, [list(ex.answers) for ex in examples])
    if metric == "mc_acc":
        per = [float(vqa_metrics.choice_index(p, list(ex.choices)) == ex.gold) for p, ex in zip(predictions, examples)]
    else:
        fn = ANSWER_METRICS[metric]
        per = [fn(p, list(ex.answers)) for p, ex in zip(predictions, examples)]
    return sum(per) / len(per), per


class GenerationEvaluator:
    """Scores VQA tasks by greedy generation with any set of blocks removed (same interface as
    pruning.evaluate.Evaluator: `loaded`, `prepared`, `evaluate(removed, progress)`)."""

    def __init__(self, loaded, tasks: list[Task], batch_size: int = 8):
        text = [t.name for t in tasks if t.kind != KIND]
        if text:
            vqa = [t.name for t in tasks if t.kind == KIND]
            raise TaskError(
                f"tasks mix text tasks ({', '.join(text)}) with VQA tasks ({', '.join(vqa)}); allowed: all of one kind per study"
            )
        if loaded.processor is None:
            raise ModelError(
                f"model {loaded.name!r} has no vision tower (it loads as a causal LM); VQA tasks "
                f"({', '.join(t.name for t in tasks)}) need an image-text-to-text model"
            )
        self.loaded = loaded
        self.batch_size = batch_size
        self.tasks = list(tasks)
        self.prepared = []
        for task in tasks:
            metric = spec_of(task.name).metric
            prompts = [render(loaded.processor, prompt_of(ex, metric)) for ex in task.examples]
            self.prepared.append(PreparedGeneration(task, metric, prompts, MAX_NEW_TOKENS[metric]))

    races = False  # pruning.scoring.ConfigEvaluator: no racing for generation

    def with_batch_size(self, batch_size: int) -> GenerationEvaluator:
        """The same evaluator generating `batch_size` answers at a time (pruning.scoring.ConfigEvaluator)."""
        return GenerationEvaluator(self.loaded, self.tasks, batch_size)

    @property
    def n_requests(self) -> int:
        return sum(len(t.examples) for t in self.tasks)

    def evaluate(self, removed=(), progress=None) -> dict[str, TaskScore]:
        """Scores per task with the units `removed` (pruning.units: blocks, sublayers) taken out."""
        with units_removed(self.loaded, removed):
            return {p.task.name: self._score(p, progress) for p in self.prepared}

    def evaluate_many(self, configs, progress=None, race=None) -> dict[tuple[int, ...], ConfigScores]:
        """Each configuration in turn (generation shares no block states and does not race):
        a failing one comes back with its error, out of memory ends the set."""
        out = {}
        for removed in configs:
            try:
                out[tuple(removed)] = ConfigScores(self.evaluate(removed, progress))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # this configuration fails; the others go on
                out[tuple(removed)] = ConfigScores(None, error=err)
        return out

    @torch.no_grad()
    def generate(self, prepared: PreparedGeneration, progress=None) -> list[str]:
        """Greedy answers to every example of a prepared task (first line, stripped)."""
        model, processor = self.loaded.model, self.loaded.processor
        dtype = next(model.parameters()).dtype
        pad_id = self.loaded.tokenizer.pad_token_id
        answers = []
        examples = prepared.task.examples
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start : start + self.batch_size]
            inputs = processor(
                images=[ex.load() for ex in batch],
                text=prepared.prompts[start : start + len(batch)],
                return_tensors="pt",
                padding=True,
                padding_side="left",
            )
            inputs = inputs.to(self.loaded.device, dtype=dtype)
            out = model.generate(
                **inputs, max_new_tokens=prepared.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id
            )
            texts = self.loaded.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            answers += [(t.strip().splitlines() or [""])[0].strip() for t in texts]
            if progress is not None:
                progress.update(len(batch))
        return answers

    def _score(self, prepared: PreparedGeneration, progress) -> TaskScore:
        task = prepared.task
        predictions = self.generate(prepared, progress)
        value, per = score_predictions(prepared.metric, task.examples, predictions)
        per_example = {"doc_id": [ex.doc_id for ex in task.examples], "prediction": predictions, "score": per}
        return TaskScore(task.name, task.kind, {"score": value, prepared.metric: value}, per_example)
