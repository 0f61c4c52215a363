"""The key-value cache of the one generation loop: a static (pre-allocated) cache samples the same
tokens as the default dynamic one from the same seed, with the same behaviour log-probs up to
floating-point rounding; an unknown cache is one line."""

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from entropy_lens.model.generate import (
    KV_CACHES,
    cache_options,
    generate,
    generate_batches,
    response_jobs,
)
from entropy_lens_cli.app import app


def prompts(tok):
    """Two prompts of different lengths (left padding inside one batch)."""
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("what is 3 + 4 ?", "12 + 30 =")]


@pytest.mark.parametrize("temperature", [None, 0.8])  # greedy and sampled
def test_static_cache_generates_what_the_dynamic_cache_does(tiny_model, tiny_tokenizer, temperature):
    p = prompts(tiny_tokenizer)
    runs = {c: generate(tiny_model, tiny_tokenizer, p, 3, 9, 6, temperature, seed=5, record_logp=True, kv_cache=c)
            for c in KV_CACHES}
    dyn, sta = runs["dynamic"], runs["static"]
    assert len(dyn) == len(sta) == 6
    for a, b in zip(dyn, sta):
        assert (a["prompt_index"], a["response_ids"], a["finished"]) == (b["prompt_index"], b["response_ids"], b["finished"])
        assert len(a["response_ids"]) > 0
        torch.testing.assert_close(torch.tensor(b["old_logp"]), torch.tensor(a["old_logp"]), rtol=1e-5, atol=1e-5)


def test_static_cache_in_the_per_batch_streams(tiny_model, tiny_tokenizer):
    """``sample``'s loop (one random stream per batch) with a static cache: the same responses."""
    jobs = response_jobs(prompts(tiny_tokenizer), 2)
    outs = {c: generate_batches(tiny_model, tiny_tokenizer, jobs, [1, 0], 2, 7, 1.0, seed=3, kv_cache=c) for c in KV_CACHES}
    for k in (0, 1):
        assert [o["response_ids"] for o in outs["static"][k]] == [o["response_ids"] for o in outs["dynamic"][k]]


def test_cache_options_and_refusal(tiny_model, tiny_tokenizer):
    assert cache_options("dynamic") == {} and cache_options("static") == {"cache_implementation": "static"}
    with pytest.raises(ValueError, match="kv_cache must be dynamic or static, got 'paged'"):
        generate(tiny_model, tiny_tokenizer, prompts(tiny_tokenizer), 1, 3, 1, None, kv_cache="paged")
    with pytest.raises(ValueError, match="kv_cache must be dynamic or static"):
        generate_batches(tiny_model, tiny_tokenizer, response_jobs(prompts(tiny_tokenizer), 1), [0], 1, 3, 1.0,
                         kv_cache="Static")


def test_sample_and_eval_with_a_static_cache_write_what_the_default_writes(tmp_path, tiny_model_dir):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"what is {a} + {b} ?", "answer": str(a + b)}) + "\n"
                            for a, b in [(1, 2), (3, 4), (12, 3)]))
    runner = CliRunner()
    frames = {}
    for cache in ("dynamic", "static"):
        roll = tmp_path / f"{cache}.parquet"
        res = runner.invoke(app, ["sample", "--model", str(tiny_model_dir), "-d", str(data), "-n", "2", "--max-new-tokens",
                                  "6", "--temperature", "0.8", "--kv-cache", cache, "-o", str(roll)])
        assert res.exit_code == 0, res.output
        ev = tmp_path / f"eval-{cache}"
        res = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "-d", str(data), "-k", "2", "--max-new-tokens",
                                  "6", "--kv-cache", cache, "-o", str(ev)])
        assert res.exit_code == 0, res.output
        frames[cache] = (pd.read_parquet(roll), pd.read_parquet(ev / "eval.parquet"))
    (ra, ea), (rb, eb) = frames["dynamic"], frames["static"]
    assert ra["response_ids"].map(list).tolist() == rb["response_ids"].map(list).tolist()
    for x, y in zip(ra["old_logp"], rb["old_logp"]):
        torch.testing.assert_close(torch.tensor(list(y)), torch.tensor(list(x)), rtol=1e-5, atol=1e-5)
    assert ra.attrs["sampling"]["kv_cache"] == "dynamic" and rb.attrs["sampling"]["kv_cache"] == "static"
    pd.testing.assert_frame_equal(ea, eb)
    bad = runner.invoke(app, ["sample", "-d", str(data), "--kv-cache", "paged", "-o", str(tmp_path / "x.parquet")])
    assert bad.exit_code == 2 and "--kv-cache must be dynamic or static, got 'paged'" in bad.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_behaviour_logprobs_hold_no_second_copy_of_the_logits(tiny_model, tiny_tokenizer):
    """Live vocabulary-width tensors while generating with ``record_logp``: generate's own per-step
    logits (b × steps × V fp32) and a few [b, V] rows, not a stacked second copy of them all."""
    from entropy_lens.testing.memtrack import live_peak_bytes

    V = tiny_model.config.vocab_size
    p = prompts(tiny_tokenizer)
    outs = []
    peak = live_peak_bytes(lambda: outs.extend(generate(tiny_model, tiny_tokenizer, p, 2, 12, 4, 1.0, seed=1,
                                                        record_logp=True)),
                           select=lambda t: t.dim() >= 2 and t.shape[-1] == V)
    steps = max(len(o["response_ids"]) for o in outs)  # the batch ran this many steps
    one_copy = 4 * steps * V * 4
    assert steps == 12 and one_copy <= peak < 1.5 * one_copy, (peak, one_copy)
