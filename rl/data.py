"""Prompt data: a JSONL or Parquet file of prompts and labels, and a cursor over it that a checkpoint can save.

Each JSONL line, or each Parquet row (slime's two formats, told apart by the suffix `.parquet`), is an object
with the prompt under `input_key`, the label under `label_key` and optional metadata under `metadata_key`.
With `apply_chat_template` the prompt is a list of OpenAI-format messages (a bare string is taken as one user
message) rendered by the tokenizer's chat template. Every row is checked when the file is read; a bad one is
an error naming the file and the line (`file:3`, 1-based, as editors count) or the row (`file:row 2`, 0-based,
as pyarrow and pandas count).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Iterator

ROLES = {"system", "user", "assistant", "tool", "developer"}
PARQUET = ".parquet"
"""The suffix of a Parquet prompt file; any other is read as JSONL."""
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad prompt file or line; the message names the file and line."""


class ChatTokenizer(Protocol):
    # A str with tokenize=False, as called here; transformers' type is the union of every form it can return.
    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Prompt:
    index: int
    """Position in the file (0-based), stable across shuffles: the identity of the prompt."""
    text: str
    """What the engine is given: the prompt, rendered by the chat template when that is on."""
    label: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None
    """The OpenAI-format messages the text was rendered from, when a chat template was applied."""


class PromptDataset:
    """All prompts of one JSONL or Parquet file, read and checked up front."""

    def __init__(
        self,
        path: str | Path,
        *,
        input_key: str = "input",
        label_key: str | None = None,
        metadata_key: str = "metadata",
        tokenizer: ChatTokenizer | None = None,
        apply_chat_template: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        max_prompt_len: int | None = None,
    ):
        """`max_prompt_len` (slime's `--rollout-max-prompt-len`): prompts of more tokens are left out."""
        self.path = Path(path)
        if (apply_chat_template or max_prompt_len is not None) and tokenizer is None:
            raise ValueError("apply_chat_template and max_prompt_len need a tokenizer")
        self.too_long = 0
        """Prompts left out for being longer than max_prompt_len."""
        if not self.path.exists():
            raise DataError(f"{self.path}: prompt data file not found")
        self.prompts: list[Prompt] = []
        rows = _parquet_rows(self.path) if self.path.suffix == PARQUET else _jsonl_rows(self.path)
        for where, row in rows:
            prompt = _prompt(row, len(self.prompts), where, input_key, label_key, metadata_key,
                             tokenizer if apply_chat_template else None, chat_template_kwargs or {})
            # counted as the engines are given them: the rendered text, without special tokens added
            if max_prompt_len is not None and tokenizer is not None and len(
                    tokenizer(prompt.text, add_special_tokens=False)["input_ids"]) > max_prompt_len:
                self.too_long += 1
                continue
            self.prompts.append(prompt)
        if not self.prompts:
            more = f" of at most {max_prompt_len} tokens (rollout_max_prompt_len)" if self.too_long else ""
            raise DataError(f"{self.path}: no prompts{more} in the file")
        if self.too_long:
            log.warning("%s: %d prompts longer than rollout_max_prompt_len = %d tokens left out", self.path,
                        self.too_long, max_prompt_len)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file:line, object) of each non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the prompt data: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file:row N, row as a dict) of each row, batch by batch: pyarrow's Python values, so that a list of
    structs is a list of dicts (chat messages) and a struct a dict (metadata), as in JSON."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'rlhpc[parquet]')") from None
    try:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for values in batch.to_pylist():
                yield f"{path}:row {row}", values
                row += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (not Parquet, cut short) is a ValueError
        raise DataError(f"{path}: cannot read the prompt data as Parquet: {e}") from None


def _prompt(
    row: dict[str, Any],
    index: int,
    where: str,
    input_key: str,
    label_key: str | None,
    metadata_key: str,
    tokenizer: ChatTokenizer | None,
    template_kwargs: dict[str, Any],
) -> Prompt:
    if input_key not in row:
        raise DataError(f"{where}: missing the prompt key {input_key!r} (keys: {', '.join(row) or 'none'})")
    if label_key is not None and label_key not in row:
        raise DataError(f"{where}: missing the label key {label_key!r} (keys: {', '.join(row)})")
    metadata = row.get(metadata_key) or {}
    if not isinstance(metadata, dict):
        raise DataError(f"{where}: {metadata_key!r} must be a JSON object")
    raw = row[input_key]
    label = row.get(label_key) if label_key is not None else None
    if tokenizer is None:
        if not isinstance(raw, str):
            raise DataError(f"{where}: {input_key!r} must be a string (or set apply_chat_template for messages)")
        if not raw.strip():
            raise DataError(f"{where}: empty prompt")
        return Prompt(index, raw, label, metadata)
    messages = _messages(raw, where, input_key)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return Prompt(index, text, label, metadata, messages)


def _messages(raw: Any, where: str, key: str) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages or a string")
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{\"role\": one of {sorted(ROLES)}, \"content\": str}}")
    if not any(m["content"].strip() for m in raw):
        raise DataError(f"{where}: empty prompt")
    return raw


class PromptCursor:
    """Which prompts come next: epoch by epoch, each epoch a fresh seeded shuffle (when shuffling).

    The state is (epoch, offset); restoring it makes the next batch exactly the one an uninterrupted run
    would have drawn, because the order of an epoch depends only on (seed, epoch).
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int):
        if size <= 0:
            raise ValueError("an empty dataset has no prompts to draw")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[int]:
        """The next n dataset indices, crossing into the next epoch when this one runs out."""
        out: list[int] = []
        while len(out) < n:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), self.size - self.offset)
            out.extend(self._order[self.offset : self.offset + take])
            self.offset += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(
                f"the saved data position is for {state['size']} prompts with seed {state['seed']}, but this run "
                f"has {self.size} prompts with seed {self.seed}: the prompt file or rollout_seed changed"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order(self.epoch)
