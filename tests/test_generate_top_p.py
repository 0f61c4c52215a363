"""Nucleus (top-p) sampling in the one generation loop: top_p = 1 is the old full-softmax path bit
for bit; a small top_p never samples outside the nucleus of a plain reference; old_logp stays the
full tempered softmax."""

import pytest
import torch

from entropy_lens.model.generate import _left_padded, generate, sample_responses

TAU = 0.7


def prompt_ids(tok):
    return [tok("what is 3 + 4 ?", add_special_tokens=False)["input_ids"]]


def old_path(model, tok, prompts, n, max_new_tokens, temperature, seed):
    """The loop as it was before top_p existed: full softmax at τ (top-k 0, top-p 1), one batch."""
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    ids, attn = _left_padded([p for p in prompts for _ in range(n)], tok.pad_token_id)
    gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=eos, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                         output_logits=True, return_dict_in_generate=True)
    return gen.sequences[:, ids.shape[1]:], torch.stack(gen.logits, dim=1)


def teacher_forced_logits(model, prompt, response):
    """[len(response), V] logits of every response position, from one forward over prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


def mass_above(logits_row, token, temperature):
    """Σ p(v) over the tokens v ranked strictly above ``token`` (plain reference: sort, cumulate)."""
    p = torch.softmax(logits_row.double() / temperature, dim=-1)
    order = torch.argsort(p, descending=True)
    rank = int((order == token).nonzero()[0, 0])
    return float(p[order[:rank]].sum())


def test_top_p_one_is_the_old_path_bitwise(tiny_model, tiny_tokenizer):
    prompts = prompt_ids(tiny_tokenizer)
    seq, logits = old_path(tiny_model, tiny_tokenizer, prompts, 6, 10, TAU, 3)
    for kwargs in ({}, {"top_p": 1.0}):
        outs = generate(tiny_model, tiny_tokenizer, prompts, 6, 10, 6, TAU, 3, record_logp=True, **kwargs)
        eos = tiny_tokenizer.eos_token_id
        for r, o in enumerate(outs):
            toks = seq[r].tolist()
            end = toks.index(eos) + 1 if eos in toks else len(toks)
            assert o["response_ids"] == toks[:end]
            ref = torch.log_softmax(logits[r, :end].float() / TAU, dim=-1).gather(-1, seq[r, :end, None])[:, 0]
            assert torch.allclose(torch.tensor(o["old_logp"]), ref, atol=1e-5, rtol=0)
    a = sample_responses(tiny_model, tiny_tokenizer, prompts, n=6, temperature=TAU, max_new_tokens=10, seed=3, batch_size=6)
    b = sample_responses(tiny_model, tiny_tokenizer, prompts, n=6, temperature=TAU, max_new_tokens=10, seed=3, batch_size=6,
                         top_p=1.0)
    assert a == b  # tokens and old_logp identical, bit for bit


@pytest.mark.parametrize("top_p", [0.3, 0.6])
def test_small_top_p_stays_in_the_nucleus(tiny_model, tiny_tokenizer, top_p):
    prompts = prompt_ids(tiny_tokenizer)
    outs = sample_responses(tiny_model, tiny_tokenizer, prompts, n=24, temperature=TAU, max_new_tokens=12, seed=1,
                            batch_size=24, top_p=top_p)
    steps = outside_full = 0
    for o in outs:
        logits = teacher_forced_logits(tiny_model, prompts[0], o["response_ids"])
        full = torch.log_softmax(logits.double() / TAU, dim=-1)
        for t, tok in enumerate(o["response_ids"]):
            steps += 1
            # inside the nucleus: the tokens ranked above it hold less than top_p of the mass
            assert mass_above(logits[t], tok, TAU) < top_p + 1e-5, (t, tok)
            # old_logp is the full tempered softmax, not the renormalised nucleus
            assert o["old_logp"][t] == pytest.approx(float(full[t, tok]), abs=1e-4)
    assert steps > 100
    # the check can fail: the full softmax does sample outside this nucleus
    for o in sample_responses(tiny_model, tiny_tokenizer, prompts, n=24, temperature=TAU, max_new_tokens=12, seed=1,
                              batch_size=24):
        logits = teacher_forced_logits(tiny_model, prompts[0], o["response_ids"])
        outside_full += sum(mass_above(logits[t], tok, TAU) >= top_p + 1e-5 for t, tok in enumerate(o["response_ids"]))
    assert outside_full > 0


def test_top_p_out_of_range(tiny_model, tiny_tokenizer):
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            generate(tiny_model, tiny_tokenizer, prompt_ids(tiny_tokenizer), 1, 2, 1, TAU, top_p=bad)


def test_sample_command_records_top_p(tmp_path, tiny_model_dir):
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from entropy_lens_cli.app import app

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "what is 1 + 2 ?", "answer": "3"}) + "\n")
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(app, ["sample", "--model", str(tiny_model_dir), "-d", str(data), "-n", "3",
                                   "--max-new-tokens", "4", "--top-p", "0.5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    sampling = pd.read_parquet(out).attrs["sampling"]
    assert sampling["top_p"] == 0.5 and sampling["temperature"] == 1.0 and sampling["n"] == 3
    bad = CliRunner().invoke(app, ["sample", "-d", str(data), "--top-p", "1.01", "-o", str(tmp_path / "x.parquet")])
    assert bad.exit_code == 2 and bad.stderr.strip().count("\n") == 0
    assert "--top-p must be in (0, 1]" in bad.stderr and not (tmp_path / "x.parquet").exists()
