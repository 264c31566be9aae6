from __future__ import annotations

import json

import pytest

from conftest import ROOT
from rl.data import DataError, PromptCursor, PromptDataset


def write_lines(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_prompts_labels_and_metadata(tmp_path):
    path = write_lines(tmp_path, [
        json.dumps({"prompt": "1+1=", "label": "2", "metadata": {"level": 1}}),
        "",
        json.dumps({"prompt": "2+2=", "label": 4}),
    ])
    ds = PromptDataset(path, input_key="prompt", label_key="label")
    assert len(ds) == 2
    assert (ds[0].text, ds[0].label, ds[0].metadata) == ("1+1=", "2", {"level": 1})
    assert (ds[1].index, ds[1].label, ds[1].metadata) == (1, 4, {})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"question": "x", "label": "1"}', "missing the prompt key 'prompt'"),
        ('{"prompt": "x"}', "missing the label key 'label'"),
        ('{"prompt": "   ", "label": "1"}', "empty prompt"),
        ('{"prompt": "x", "label": "1", "metadata": 3}', "'metadata' must be a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, ['{"prompt": "ok", "label": "1"}', line])
    with pytest.raises(DataError) as e:
        PromptDataset(path, input_key="prompt", label_key="label")
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        PromptDataset(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="no prompts"):
        PromptDataset(write_lines(tmp_path, [""]))


def test_chat_template_renders_openai_messages(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = PromptDataset(ROOT / "data/math/sample.jsonl", input_key="prompt", label_key="label",
                       tokenizer=tokenizer, apply_chat_template=True)
    assert ds[0].text.startswith("<|im_start|>user\nWhat is the sum")
    assert ds[0].text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ds[2].text.startswith("<|im_start|>system\nReason step by step.<|im_end|>\n<|im_start|>user\n")
    assert ds[2].metadata == {"source": "sample"} and ds[1].label == "\\frac{1}{2}"


def test_chat_template_checks_messages(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_lines(tmp_path, [json.dumps({"input": [{"role": "robot", "content": "hi"}]})])
    with pytest.raises(DataError, match=r"d.jsonl:1: message 0 must be"):
        PromptDataset(path, tokenizer=tokenizer, apply_chat_template=True)
    path = write_lines(tmp_path, [json.dumps({"input": "plain question"})])
    assert "user\nplain question" in PromptDataset(path, tokenizer=tokenizer, apply_chat_template=True)[0].text


def test_cursor_covers_each_epoch_once_and_reshuffles():
    cursor = PromptCursor(10, shuffle=True, seed=7)
    first, second = cursor.next_batch(10), cursor.next_batch(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second and first != list(range(10))
    assert PromptCursor(5, shuffle=False, seed=7).next_batch(7) == [0, 1, 2, 3, 4, 0, 1]


def test_restored_cursor_continues_with_the_exact_next_prompt():
    straight = PromptCursor(7, shuffle=True, seed=3)
    expected = [straight.next_batch(3) for _ in range(6)]
    interrupted = PromptCursor(7, shuffle=True, seed=3)
    got = [interrupted.next_batch(3) for _ in range(4)]
    resumed = PromptCursor(7, shuffle=True, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    got += [resumed.next_batch(3) for _ in range(2)]
    assert got == expected


def test_cursor_refuses_a_state_from_other_data():
    cursor = PromptCursor(7, shuffle=True, seed=3)
    with pytest.raises(ValueError, match="prompt file or rollout_seed changed"):
        cursor.load_state_dict(PromptCursor(8, shuffle=True, seed=3).state_dict())


class WordTokenizer:
    """One token per word: lengths a reader can count."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


def test_prompts_longer_than_max_prompt_len_are_left_out(tmp_path, caplog):
    """slime's --rollout-max-prompt-len: long prompts are filtered out when the data is read."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"input": " ".join(["w"] * n)}) + "\n" for n in (3, 5, 4, 6)))
    data = PromptDataset(path, tokenizer=WordTokenizer(), max_prompt_len=4)
    assert [p.text.count("w") for p in data.prompts] == [3, 4] and [p.index for p in data.prompts] == [0, 1]
    assert data.too_long == 2 and "2 prompts longer than rollout_max_prompt_len = 4 tokens" in caplog.text
    with pytest.raises(DataError, match="no prompts of at most 2 tokens"):
        PromptDataset(path, tokenizer=WordTokenizer(), max_prompt_len=2)
    assert len(PromptDataset(path)) == 4


# Parquet (slime's other format): the same rows as JSONL give the same prompts, so the same shuffles and
# resumable positions (PromptCursor sees only the dataset's size).

def write_parquet(tmp_path, rows, name="d.parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    # columns from every row's keys (from_pylist takes the first row's); a row without one holds null there
    table = pa.Table.from_struct_array(pa.array(rows))
    pq.write_table(table, path, row_group_size=2)  # several row groups: rows are counted across them
    return path


def test_parquet_rows_are_the_prompts_their_jsonl_lines_would_be(tmp_path):
    rows = [{"prompt": f"{i}+{i}=", "label": str(2 * i), "metadata": {"level": i}} for i in range(5)]
    parquet = PromptDataset(write_parquet(tmp_path, rows), input_key="prompt", label_key="label")
    jsonl = PromptDataset(write_lines(tmp_path, [json.dumps(r) for r in rows]), input_key="prompt",
                          label_key="label")
    assert parquet.prompts == jsonl.prompts and parquet[4].metadata == {"level": 4}


def test_parquet_chat_messages_render_with_the_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in (ROOT / "data/math/sample.jsonl").read_text().splitlines() if line]
    options = dict(input_key="prompt", label_key="label", tokenizer=tokenizer, apply_chat_template=True)
    parquet = PromptDataset(write_parquet(tmp_path, rows), **options)
    assert parquet.prompts == PromptDataset(ROOT / "data/math/sample.jsonl", **options).prompts
    assert parquet[0].text.startswith("<|im_start|>user\nWhat is the sum")


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "   ", "label": "1"}, "empty prompt"),
    ({"label": "1"}, "'prompt' must be a string"),  # a column's null
    ({"prompt": "x", "label": "1", "metadata": "level 1"}, "'metadata' must be a JSON object"),
])
def test_a_bad_parquet_row_names_file_and_row(tmp_path, row, message):
    good = {"prompt": "ok", "label": "1"}
    path = write_parquet(tmp_path, [good, good, good, row])
    with pytest.raises(DataError) as e:
        PromptDataset(path, input_key="prompt", label_key="label")
    assert str(e.value).startswith(f"{path}:row 3: ") and message in str(e.value)


def test_a_parquet_file_without_the_prompt_column_says_which_columns_it_has(tmp_path):
    path = write_parquet(tmp_path, [{"question": "x", "label": "1"}])
    with pytest.raises(DataError, match=r"d.parquet:row 0: missing the prompt key 'prompt' \(keys: question, label\)"):
        PromptDataset(path, input_key="prompt", label_key="label")


def test_a_file_that_is_not_parquet_is_an_error_naming_it(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text('{"prompt": "a jsonl line under the wrong suffix"}\n')
    with pytest.raises(DataError, match=f"{path}: cannot read the prompt data as Parquet"):
        PromptDataset(path, input_key="prompt")
    with pytest.raises(DataError, match="not found"):
        PromptDataset(tmp_path / "none.parquet")


def test_config_takes_jsonl_and_parquet_prompt_files_and_refuses_other_suffixes(write_config, tmp_path):
    from conftest import MINIMAL
    from rlhpc.config import ConfigError, load_config

    write_parquet(tmp_path, [{"input": "1+1=", "label": "2"}], name="train.parquet")
    evals = '[eval]\neval_prompt_data = { aime = "train.parquet" }\n'
    cfg = load_config(write_config(MINIMAL.replace("train.jsonl", "train.parquet") + evals))
    assert cfg.rollout.prompt_data.suffix == cfg.eval.eval_prompt_data["aime"].suffix == ".parquet"
    for override in ("rollout.prompt_data='train.json'", "eval.eval_prompt_data={aime = 'aime.csv'}"):
        with pytest.raises(ConfigError, match=r"neither \.jsonl nor \.parquet") as e:
            load_config(write_config(MINIMAL), [override])
        assert override.partition("=")[0] in str(e.value)
