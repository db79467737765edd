"""Scoring of generated answers, as the benchmarks' official evaluations define it.

- `vqa_accuracy`: VQA v2 (also TextVQA, OK-VQA): the answer is normalised as the official
  evaluation (GT-Vision-Lab/VQA, vqaEval.py) does, and scored min(#humans who gave it / 3, 1)
  averaged over the 10 subsets of 9 human answers.
- `anls`: Average Normalized Levenshtein Similarity (ST-VQA, DocVQA).
- `exact_match`: normalised answer equal to a reference (TallyQA counting).
- `choice_index`: which option of a multiple-choice item a generated answer names.
- `cider_d`: CIDEr-D as the COCO caption evaluation (pycocoevalcap) computes it.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from rapidfuzz.distance import Levenshtein

# --- VQA answer normalisation (the official vqaEval.py tables) -------------------------------
# Hand-written: the official evaluation is a script in a repository (GT-Vision-Lab/VQA), not a package;
# its tables and rules are reproduced here, quirks included, so that scores match it.

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a period not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation: whitespace, punctuation, lowercase, number words to
    digits, articles dropped, contractions restored ("Two dogs." -> "2 dogs")."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: the mean over leave-one-out subsets of the human answers of
    min(#answers in the subset equal to the prediction / 3, 1).

    With the official 10 answers this is the average over the 10 subsets of 9. Human answers
    get the same normalisation as the prediction (the released annotations already carry it;
    raw answers in local files may not).
    """
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) == pred for a in answers))


# --- ANLS --------------------------------------------------------------------------------------


def anls(prediction: str, answers: list[str], tau: float = 0.5) -> float:
    """ANLS of one question: max over the answers of 1 - NL if NL < tau else 0, where NL is the
    Levenshtein distance divided by the longer string's length; strings are lowercased,
    stripped and their whitespace runs collapsed (as the ST-VQA/DocVQA evaluation does)."""
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for answer in answers:
        gold = " ".join(answer.lower().split())
        nl = Levenshtein.normalized_distance(gold, pred)  # edit distance / the longer length; 0 for two empty strings
        if nl < tau:
            best = max(best, 1.0 - nl)
    return best


# --- multiple choice ---------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTER = re.compile(r"\(?([A-Z])(?:[.:)]|$)")


def choice_index(prediction: str, choices: list[str]) -> int:
    """The option a generated answer names, or -1.

    A leading option letter ("B", "B.", "(B) ...", "B: ...") wins; otherwise an answer equal to
    an option's text after VQA normalisation picks that option.
    """
    text = prediction.strip()
    letter = _LETTER.match(text)
    if letter and LETTERS.index(letter.group(1)) < len(choices):
        return LETTERS.index(letter.group(1))
    pred = normalize_answer(text)
    return next((i for i, c in enumerate(choices) if normalize_answer(c) == pred), -1)


# --- CIDEr-D -----------------------------------------------------------------------------------
# Hand-written: pycocoevalcap, the reference implementation, is research code that bundles Java programs
# (PTB tokenizer, METEOR, SPICE) around a small scorer; its CIDEr-D arithmetic is reproduced here.

_TOKEN = re.compile(r"[a-z0-9]+|'[a-z]+")


def caption_tokens(text: str) -> list[str]:
    """Lowercased words with punctuation dropped and clitics split ("dog's" -> dog 's), standing
    in for the Stanford PTB tokenizer that the COCO evaluation runs (a Java program)."""
    return _TOKEN.findall(text.lower())


def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(predictions: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of a set of captions: (corpus score, score per image).

    As pycocoevalcap computes it: TF-IDF vectors of 1..4-grams whose document frequencies count
    the evaluated images whose references contain the n-gram; per n, the cosine with each
    reference uses candidate weights clipped at the reference's, times the Gaussian penalty
    exp(-delta^2 / (2 sigma^2)) on the length difference (counted in bigrams, as the reference
    code does); the mean over n, averaged over the references, times 10.
    """
    cands = [_ngrams(caption_tokens(p), n) for p in predictions]
    refs = [[_ngrams(caption_tokens(r), n) for r in rs] for rs in references]
    doc_freq = Counter(g for rs in refs for g in {g for r in rs for g in r})
    log_images = math.log(float(len(refs)))

    def vector(counts: Counter):
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(v * v for v in level.values())) for level in vec]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, norms, length

    scores = []
    for cand, rs in zip(cands, refs):
        vec, norms, length = vector(cand)
        total = 0.0
        for ref in rs:
            rvec, rnorms, rlength = vector(ref)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norms[k] and rnorms[k]:
                    value /= norms[k] * rnorms[k]
                total += value * penalty / n
        scores.append(10.0 * total / len(rs))
    return (sum(scores) / len(scores) if scores else 0.0), scores
