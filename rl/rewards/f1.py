"""SQuAD-style token F1 between a response and the reference answer."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = str.maketrans("", "", string.punctuation)
_YES_NO = {"yes", "no", "noanswer"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalization)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_reward(response: str, label: object) -> float:
    """F1 = 2PR / (P + R) over the multiset of normalized tokens; yes/no answers must match exactly."""
    pred, truth = normalize(response), normalize(str(label))
    if pred == truth:
        return float(bool(pred))
    if pred in _YES_NO or truth in _YES_NO:
        return 0.0
    pred_tokens, truth_tokens = pred.split(), truth.split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)
