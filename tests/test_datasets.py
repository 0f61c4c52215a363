import pandas as pd
import pytest

from entropy_lens.io.datasets import load_prompts
from entropy_lens.io.tables import InputError


def _verl_rows():
    return [
        {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "form Answer:  (without quotes) where  is"}],
         "ability": "math", "reward_model": {"ground_truth": "18", "style": "rule"},
         "extra_info": {"index": 0, "raw_problem": "Janet has 3 eggs...", "split": "test"}},
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve x. Put the answer in \\boxed{}."}],
         "ability": "math", "reward_model": {"ground_truth": "7", "style": "rule"}, "extra_info": {"index": 1}},
    ]


def test_verl_schema_dataset(tmp_path):
    p = tmp_path / "d.parquet"
    pd.DataFrame(_verl_rows()).to_parquet(p)
    df = load_prompts(p)
    assert df["ground_truth"].tolist() == ["18", "7"]
    # gsm8k rows: the broken template is replaced by raw_problem + our instruction
    assert df["prompt"][0][0]["content"].startswith("Janet has 3 eggs") and "Answer:" in df["prompt"][0][0]["content"]
    assert df["prompt"][1][0]["content"] == "Solve x. Put the answer in \\boxed{}."


def test_problem_answer_table_and_limit(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": "4"}\n')
    df = load_prompts(p, limit=1)
    assert len(df) == 1 and df["prompt"][0][0]["role"] == "user"


def test_not_a_dataset(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"x": 1}\n')
    with pytest.raises(InputError, match="not a prompt dataset"):
        load_prompts(p)
    q = tmp_path / "e.parquet"
    rows = _verl_rows()
    rows[0]["reward_model"] = {"style": "rule"}
    pd.DataFrame(rows).to_parquet(q)
    with pytest.raises(InputError, match="row 0: reward_model has no ground_truth"):
        load_prompts(q)
