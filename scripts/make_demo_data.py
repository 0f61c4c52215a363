"""Rebuild the demo data shipped in entropy_lens/data/ (run once by maintainers; minutes to hours on CPU).

1. Screen the first --screen GSM8K test problems (../shared/datasets/gsm8k_test.parquet, MIT,
   openai/grade-school-math) with --n samples each from the bundled SmolLM2-135M-Instruct at τ=1.
2. Keep problems with a mixed outcome (some correct, some wrong: a non-zero GRPO advantage) and
   write them to gsm8k_demo.parquet (problem, answer, screening pass rate).
3. Write the screening samples of the kept problems as a rollout file with exact token ids and
   behaviour log-probs: smollm2_gsm8k_rollouts.parquet (what `validate` runs on by default).

Usage: python scripts/make_demo_data.py --datasets ../shared/datasets --shortest --screen 64 --n 4 --out entropy_lens/data
("index" in gsm8k_demo.parquet is the row of the GSM8K test split.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from entropy_lens.io.prompts import DEFAULT_INSTRUCTION, chat_prompt_ids
from entropy_lens.model.generate import sample_responses
from entropy_lens.model.load import load_model
from entropy_lens.rewards import score_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", type=Path, required=True)
    ap.add_argument("--screen", type=int, default=120)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--log", type=Path, default=Path("/tmp/screen.jsonl"))
    ap.add_argument("--shortest", action="store_true", help="screen the --screen shortest problems instead of the first")
    args = ap.parse_args()
    model, tok = load_model(None)
    df = pd.read_parquet(args.datasets / "gsm8k_test.parquet")
    df["test_index"] = range(len(df))
    if args.shortest:
        df = df.iloc[df["extra_info"].map(lambda e: len(e["raw_problem"])).argsort(kind="stable")]
    df = df.head(args.screen).reset_index(drop=True)
    problems = [e["raw_problem"] for e in df["extra_info"]]
    answers = [r["ground_truth"] for r in df["reward_model"]]
    rows = []
    done = set()
    if args.log.exists():
        rows = [json.loads(l) for l in args.log.read_text().splitlines() if l.strip()]
        done = {r["problem_index"] for r in rows}
    todo = [i for i in range(len(problems)) if i not in done]
    block = 8
    with args.log.open("a") as log:
        for k in range(0, len(todo), block):
            idx = todo[k : k + block]
            msgs = [[{"role": "user", "content": f"{problems[i]}\n\n{DEFAULT_INSTRUCTION}"}] for i in idx]
            pids = [chat_prompt_ids(tok, m) for m in msgs]
            outs = sample_responses(model, tok, pids, n=args.n, max_new_tokens=args.max_new_tokens,
                                    seed=args.seed + idx[0], batch_size=len(pids) * args.n)
            texts = [tok.decode(o["response_ids"], skip_special_tokens=True) for o in outs]
            golds = [answers[idx[o["prompt_index"]]] for o in outs]
            rewards = score_batch(texts, golds, "math")
            for o, t, r in zip(outs, texts, rewards):
                i = idx[o["prompt_index"]]
                row = {"problem_index": i, "problem": problems[i], "answer": answers[i], "prompt": msgs[o["prompt_index"]],
                       "response": t, "reward": r, "prompt_ids": o["prompt_ids"], "response_ids": o["response_ids"],
                       "old_logp": o["old_logp"]}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
            log.flush()
    frame = pd.DataFrame(rows)
    rate = frame.groupby("problem_index")["reward"].apply(lambda r: float((r > 0).mean()))
    mixed = rate[(rate > 0) & (rate < 1)].index
    probs = frame.drop_duplicates("problem_index").set_index("problem_index").loc[mixed]
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"index": df["test_index"].to_numpy()[mixed], "problem": probs["problem"].values, "answer": probs["answer"].values,
                  "screen_pass_rate": rate.loc[mixed].values}).to_parquet(args.out / "gsm8k_demo.parquet", index=False)
    roll = frame[frame["problem_index"].isin(mixed)].copy()
    roll["group"] = roll["problem_index"].astype(str)
    roll["ground_truth"] = roll["answer"]
    roll[["prompt", "response", "reward", "ground_truth", "group", "prompt_ids", "response_ids", "old_logp"]].to_parquet(
        args.out / "smollm2_gsm8k_rollouts.parquet", index=False)
    print(f"screened {len(rate)} problems, kept {len(mixed)} with mixed outcomes, {len(roll)} rollouts")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
