"""Offline tasks built deterministically from the documentation text that ships with Python.

The corpus is `pydoc_data.topics` (79 help topics). Topics are assigned to the train or
validation split by a stable hash of their name (about one in five is validation);
validation passages and contexts that also occur in a train topic are dropped.

- `pydoc_ppl`: passages of about 150 words; metric: perplexity.
- `pydoc_cloze`: a 32-word context and four candidate next words: the true one and
  three distractors drawn from the same split's vocabulary; metric: accuracy (chance 0.25).
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

from pruning.tasks import Document, MultipleChoice, Task

TASKS = ("pydoc_ppl", "pydoc_cloze")
PASSAGE_WORDS = 150
CONTEXT_WORDS = 32
CLOZE_SPACING = 30  # words between two cloze targets of the same topic
NUM_CHOICES = 4
_TARGET = re.compile(r"[a-z]{4,}")


def _split_of(topic: str) -> str:
    return "validation" if int(hashlib.sha1(topic.encode()).hexdigest(), 16) % 5 == 0 else "train"


@lru_cache(maxsize=2)
def topics(split: str) -> tuple[tuple[str, str], ...]:
    """(name, text) of the pydoc topics in `split`, sorted by name."""
    from pydoc_data.topics import topics as all_topics

    return tuple((name, all_topics[name]) for name in sorted(all_topics) if _split_of(name) == split)


@lru_cache(maxsize=3)
def corpus_text(split: str | None = None) -> str:
    """The pydoc topics of one split (or all of them) joined by blank lines."""
    splits = ("train", "validation") if split is None else (split,)
    parts = [text for s in splits for _, text in topics(s)]
    return "\n\n".join(parts)


def _words(text: str) -> list[re.Match]:
    return list(re.finditer(r"\S+", text))


def _leaks(split: str, passage: str) -> bool:
    """Validation text that also appears in a train topic (pydoc repeats some sections)."""
    return split == "validation" and passage in corpus_text("train")


def passages(split: str) -> list[Document]:
    """Consecutive ~150-word slices of each topic, original formatting kept."""
    docs = []
    for _, text in topics(split):
        words = _words(text)
        for start in range(0, len(words) - PASSAGE_WORDS // 2, PASSAGE_WORDS):
            end = min(start + PASSAGE_WORDS, len(words)) - 1
            passage = text[words[start].start() : words[end].end()]
            if not _leaks(split, passage):
                docs.append(Document(len(docs), passage))
    return docs


def cloze_items(split: str) -> list[MultipleChoice]:
    """True next word against three distractors, after a 32-word context."""
    split_topics = topics(split)
    vocabulary = sorted({m.group() for _, text in split_topics for m in _words(text) if _TARGET.fullmatch(m.group())})
    items = []
    for name, text in split_topics:
        words = _words(text)
        i = CONTEXT_WORDS
        while i < len(words):
            target = words[i].group()
            if not _TARGET.fullmatch(target):
                i += 1
                continue
            rng = random.Random(f"{name}:{i}")
            distractors = rng.sample([w for w in vocabulary if w != target], NUM_CHOICES - 1)
            choices = list(distractors)
            gold = rng.randrange(NUM_CHOICES)
            choices.insert(gold, target)
            context = text[words[i - CONTEXT_WORDS].start() : words[i - 1].end()]
            if _leaks(split, context):
                i += CLOZE_SPACING
                continue
            items.append(
                MultipleChoice(
                    doc_id=len(items),
                    requests=tuple((context, " " + c) for c in choices),
                    gold=gold,
                    choice_lengths=tuple(float(len(c)) for c in choices),
                )
            )
            i += CLOZE_SPACING
    return items


def load(name: str, split: str) -> Task:
    """Build builtin task `name` on `split`."""
    if name == "pydoc_ppl":
        return Task(name, split, "perplexity", passages(split), source="builtin")
    return Task(name, split, "multiple_choice", cloze_items(split), source="builtin")
