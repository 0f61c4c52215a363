"""Prompt datasets: every defect of the public verl-schema math files, mimicked in small files."""

import pandas as pd
import pytest

from entropy_lens.io.datasets import load_problems, load_prompts, split_template
from entropy_lens.io.prompts import DEFAULT_INSTRUCTION, MATH_INSTRUCTION
from entropy_lens.io.tables import InputError

ANSWER_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
ANSWER_TAIL = 'Remember to put your answer on its own line after "Answer:".'
BOXED_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form "
              "\\boxed{Answer} where Answer is the answer to the problem.")
BOXED_TAIL = "Remember to put your answer in \\boxed{...} format on its own line."
BROKEN_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer:  (without quotes) where  is the answer to the problem.")
ZH_TAIL = '让我们一步一步地思考。请以"Answer: \\boxed{<final_answer>}"的格式输出最终答案。'


def row(content, truth, source, extra=None):
    return {"data_source": source, "prompt": [{"role": "user", "content": content}], "ability": "MATH",
            "reward_model": {"ground_truth": truth, "style": "rule"}, "extra_info": extra or {"index": "0"}}


def write(tmp_path, name, rows):
    p = tmp_path / name
    pd.DataFrame(rows).to_parquet(p)
    return p


def test_gsm8k_broken_template_uses_raw_problem_and_our_instruction(tmp_path):
    problem = "Janet has 3 eggs and buys 2 more. How many eggs?"
    p = write(tmp_path, "gsm8k_test.parquet", [
        row(f"{BROKEN_HEAD}\n\n{problem}\n\n{ANSWER_TAIL}", "5", "gsm8k_test",
            {"index": "0", "raw_problem": problem, "split": "test"}),
    ])
    d = load_problems(p)
    assert d.loc[0, "problem"] == problem and d.loc[0, "answer"] == "5"
    assert d.loc[0, "prompt"] == [{"role": "user", "content": f"{problem}\n\n{DEFAULT_INSTRUCTION}"}]
    assert (d.loc[0, "data_source"], d.loc[0, "index"], d.loc[0, "count"], d.loc[0, "row"]) == ("gsm8k_test", 0, 1, 0)


def test_aime_repeats_collapse_and_keep_the_intact_prompt(tmp_path):
    probs = ["Find $x$ if $x+1=3$.", "Compute $2^{10}$."]
    rows = [row(f"{ANSWER_HEAD}\n\n{probs[i % 2]}\n\n{ANSWER_TAIL}", ["2", "1024"][i % 2], "aime_2024",
                {"index": str(i % 2), "raw_problem": probs[i % 2], "split": "None"}) for i in range(6)]
    d = load_problems(write(tmp_path, "aime24.parquet", rows))
    assert d["problem"].tolist() == probs and d["answer"].tolist() == ["2", "1024"]
    assert d["count"].tolist() == [3, 3] and d["row"].tolist() == [0, 1] and d["index"].tolist() == [0, 1]
    assert d.loc[0, "prompt"][0]["content"] == rows[0]["prompt"][0]["content"]  # the template is intact


def test_aime25_amc23_wrong_raw_problem_slice_is_ignored(tmp_path):
    problem = "Find the sum of all integer bases $b>9$ for which $17_{b}$ divides $97_{b}$."
    bad_raw = " by step. The last line of your response should be of the form Answer: $Answer\n\n" + problem
    p = write(tmp_path, "aime25.parquet", [
        row(f"{ANSWER_HEAD}\n\n{problem}\n\n{ANSWER_TAIL}", "70", "aime_2025", {"index": "0", "raw_problem": bad_raw}),
    ])
    d = load_problems(p)
    assert d.loc[0, "problem"] == problem
    assert d.loc[0, "prompt"][0]["content"].startswith(ANSWER_HEAD)


def test_dapo_problem_sits_between_instruction_lines(tmp_path):
    multi = "Let $a$ be\n\nthe answer to $a+a=4$."
    rows = [
        row(f"{BOXED_HEAD}\n\n{multi}\n\n{BOXED_TAIL}", "2", "math_dapo", {"index": "u1"}),
        row(f"{BOXED_HEAD}\n\n Another problem: $3\\cdot 4$.\n{BOXED_TAIL}", "12", "math_dapo", {"index": "u2"}),
        row(f"\n设 $x=1$，求 $x+1$.\n\n{ZH_TAIL}\n{ZH_TAIL}", "2", "math_dapo", {"index": "u3"}),
    ]
    d = load_problems(write(tmp_path, "dapo.parquet", rows))
    assert d["problem"].tolist() == [multi, "Another problem: $3\\cdot 4$.", "设 $x=1$，求 $x+1$."]
    # intact instructions: the dataset's own prompts are kept
    assert [m[0]["content"] for m in d["prompt"]] == [r["prompt"][0]["content"] for r in rows]
    assert split_template(rows[2]["prompt"][0]["content"])[1] == [ZH_TAIL, ZH_TAIL]


def test_math500_bare_problem_gets_our_instruction(tmp_path):
    problem = "Solve the following equation for $x$: $\\frac{2}{3} = \\frac{4}{x-5}$."
    p = write(tmp_path, "math500.parquet", [row(problem, "11", "math500", {"index": "0", "raw_problem": problem})])
    d = load_problems(p)
    assert d.loc[0, "problem"] == problem  # a problem that starts with "Solve the following" is not a template
    assert d.loc[0, "prompt"] == [{"role": "user", "content": f"{problem}\n\n{MATH_INSTRUCTION}"}]


def test_repeats_that_disagree_on_the_answer(tmp_path):
    rows = [row(f"{BOXED_HEAD}\n\n{t}\n\n{BOXED_TAIL}", a, "math_dapo")
            for t, a in [("P zero.", "1"), ("P one.", "2"), (" P one. ", "3"), ("P two.", "4")]]
    p = write(tmp_path, "dapo.parquet", rows)
    with pytest.raises(InputError, match=r"dapo.parquet: problem 1 \(rows 1 and 2\) is repeated with different answers"):
        load_problems(p)
    d = load_problems(p, conflicts="drop")
    assert d["problem"].tolist() == ["P zero.", "P two."] and d["index"].tolist() == [0, 1]
    assert d.attrs["dropped"] == [1]


def test_ground_truth_missing_or_empty(tmp_path):
    for i, rm in enumerate([{"style": "rule"}, {"ground_truth": " ", "style": "rule"}]):
        r = row("What is 1+1?", "2", "x")
        r["reward_model"] = rm
        p = write(tmp_path, f"d{i}.parquet", [row("What is 2+2?", "4", "x"), r])
        with pytest.raises(InputError, match="row 1: reward_model has no ground_truth"):
            load_problems(p)
    q = tmp_path / "noanswer.jsonl"
    q.write_text('{"problem": "1+1?"}\n')
    with pytest.raises(InputError, match="no ground truth"):
        load_problems(q)
    q.write_text('{"problem": "1+1?", "answer": null}\n')
    with pytest.raises(InputError, match="row 0: no answer"):
        load_problems(q)


def test_problem_answer_table_and_limit(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": "4"}\n')
    df = load_prompts(p, limit=1)
    assert len(df) == 1 and df["prompt"][0] == [{"role": "user", "content": f"1+1?\n\n{DEFAULT_INSTRUCTION}"}]
    assert df["ground_truth"].tolist() == ["2"] and df["data_source"].tolist() == ["d"]


def test_not_a_dataset(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"x": 1}\n')
    with pytest.raises(InputError, match="not a prompt dataset"):
        load_prompts(p)
    q = tmp_path / "e.parquet"
    pd.DataFrame([{"data_source": "x", "prompt": "not messages", "reward_model": {"ground_truth": "1"}}]).to_parquet(q)
    with pytest.raises(InputError, match="row 0: prompt is not a list of chat messages"):
        load_problems(q)
