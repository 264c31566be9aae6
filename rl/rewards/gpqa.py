"""GPQA-style multiple choice: 1 if the response picks the right option letter, else 0."""

from __future__ import annotations

import re
import string
from typing import Any

DEFAULT_LETTERS = string.ascii_uppercase[:10]
_PATTERNS = (
    r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?\b",
    r"\b([A-Z])\)?\s*is\s*(?:the\s*)?correct",
    r"final\s*(?:answer|option)\s*(?:is|:)?\s*\(?([A-Z])\)?\b",
)


def _after_reasoning(text: str) -> str:
    return text.rsplit("</think>", 1)[-1]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def chosen_letter(response: str, letters: str) -> str | None:
    """The option the response settles on: an explicit "answer is X", else its last standalone valid letter."""
    text = _after_reasoning(response)
    for pattern in _PATTERNS:
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            if (letter := m.group(1).upper()) in letters:
                return letter
    for letter in reversed(re.findall(r"\b([A-Z])\b", text)):
        if letter in letters:
            return letter
    return None


def gpqa_reward(response: str, label: Any, metadata: dict[str, Any] | None = None) -> float:
    """The label is the correct letter, its 0-based index, or the text of the correct choice (with
    `metadata["choices"]`); `metadata["correct_letter"]` wins when given. Without a letter in the response,
    the correct choice's text appearing in it counts."""
    metadata = metadata or {}
    choices = metadata.get("choices")
    if isinstance(choices, dict):
        choices = list(choices.values())
    letters = "".join(str(x).upper() for x in metadata.get("valid_letters") or []) or (
        string.ascii_uppercase[: len(choices)] if choices else DEFAULT_LETTERS
    )
    correct = str(metadata.get("correct_letter") or "").strip().upper() or None
    label_text = str(label).strip() if isinstance(label, str) else None
    if correct is None and label_text and len(label_text) == 1 and label_text.upper() in letters:
        correct = label_text.upper()
    elif correct is None and isinstance(label, int) and 0 <= label < len(letters):
        correct = letters[label]
    elif correct is None and choices and label_text:
        correct = next((letters[i] for i, c in enumerate(choices) if _norm(str(c)) == _norm(label_text)), None)

    picked = chosen_letter(response, letters)
    if picked and correct:
        return float(picked == correct)
    targets = [label_text] if label_text else []
    if correct and choices and letters.index(correct) < len(choices):
        targets.append(str(choices[letters.index(correct)]))
    said = _norm(_after_reasoning(response))
    return float(any(_norm(t) and _norm(t) in said for t in targets))
