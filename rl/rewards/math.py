"""Mathematical answers: the last `\\boxed{}` of a response, and equivalence by math-verify (sympy-backed)."""

from __future__ import annotations

import threading

from math_verify import parse, verify


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in text, braces matched; None when there is none
    or it is cut off."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    open_at = rest.find("{")
    if open_at < 0 or rest[:open_at].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for i in range(open_at, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[open_at + 1 : i]
    return None


def equivalent(answer: str, truth: str) -> bool:
    """Whether two answers denote the same mathematical object: `\\frac{1}{2}` ≡ `0.5` ≡ `\\dfrac12`,
    `1,000` ≡ `1000`, units and a trailing period ignored."""
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_as_math(truth), parsing_timeout=timeout)
    pred = parse(_as_math(answer), parsing_timeout=timeout)
    if not gold or not pred:
        return answer.strip() == truth.strip() != ""
    return bool(verify(gold, pred, timeout_seconds=timeout))


def _as_math(text: str) -> str:
    text = text.strip().rstrip(".").strip()
    return text if "$" in text or "\\(" in text or "\\[" in text else f"${text}$"


def truth_of(label: object) -> str:
    """The ground-truth answer of a label: its boxed content when it has one."""
    text = str(label)
    return last_boxed(text) or text


def math_reward(response: str, label: object) -> float:
    """slime/verl `math`: 1 if the response's last boxed answer equals the label, else 0."""
    answer = last_boxed(response)
    truth = truth_of(label)
    if answer is None or not truth.strip():
        return 0.0
    return float(equivalent(answer, truth))
