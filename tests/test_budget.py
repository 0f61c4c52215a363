"""The memory budget (model/budget.py): the estimate's formula, the available memory, the check
that refuses a run that cannot fit (in validate and compare --measure, before any work), and
``max_len`` truncation (pipelines/prepare.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import arithmetic_rows, make_model

from entropy_lens.io.rollouts import validate_rollouts
from entropy_lens.model import budget as bg
from entropy_lens.model.forward import pack, response_stats
from entropy_lens.model.update import grpo_token_mean_loss, one_step_update
from entropy_lens.pipelines.prepare import prepare
from entropy_lens.pipelines.validate import ValidateSettings, run_validate
from entropy_lens.testing.memtrack import live_peak_bytes

MiB = 2**20


def test_terms_follow_the_documented_formula():
    lengths, resp = [10, 30, 20], [8, 25, 12]
    L, d, h, V, I, b, e, P = 2, 16, 4, 100, 40, 2, 4, 1000
    t = bg.estimate_terms(lengths, L, d, h, V, b, e, True, response_lengths=resp, intermediate=I, n_params=P)
    S, M, act = 30, 25 + 12, (12 * d + 6 * I) * e
    assert t["params"] == 4 * P * e
    low = bg.estimate_terms(lengths, L, d, h, V, b, 2, True, response_lengths=resp, intermediate=I, n_params=P)
    assert low["params"] == 14 * P  # bf16 weights + three fp32 copies of the fp32 master path
    assert t["update"] == b * S * L * act + 4 * M * V * 4
    closed = bg.estimate_terms(lengths, L, d, h, V, b, e, True, response_lengths=resp, intermediate=I, n_params=P,
                               closed_form_head=True)
    rows = 128 * 2**20 // (8 * V)
    assert closed["update"] == b * S * L * act + 3 * min(M, rows) * V * 4
    wide = bg.estimate_terms(lengths, L, d, h, 2**20, b, e, False, response_lengths=resp, intermediate=I,
                             closed_form_head=True)  # 16 rows a chunk, fewer than M = 37
    assert wide["update"] == b * S * L * act + 3 * 16 * 2**20 * 4
    gpu = bg.estimate_terms(lengths, L, d, h, 2**20, b, e, False, response_lengths=resp, intermediate=I,
                            closed_form_head=True, head_chunk_bytes=2**30)  # 128 rows, all 37 of M
    assert gpu["update"] == b * S * L * act + 3 * M * 2**20 * 4
    low_closed = bg.estimate_terms(lengths, L, d, h, V, b, 2, False, response_lengths=resp, intermediate=I,
                                   closed_form_head=True)  # bf16: + the fp32 dL/dW accumulator and its temporaries
    assert low_closed["update"] == b * S * L * (12 * d + 6 * I) * 2 + 3 * min(M, rows) * V * 4 + (4 + 4) * V * d
    assert t["jvp"] == 6 * b * h * S * S * 4 + 2 * b * S * act + 8 * M * V * 4
    assert t["forward"] == b * S * act + bg.FORWARD_CHUNK_BYTES
    assert t["peak"] == t["params"] + max(t["update"], t["jvp"], t["forward"])
    assert bg.estimate_peak_bytes(lengths, L, d, h, V, b, e, True, response_lengths=resp, intermediate=I,
                                  n_params=P) == t["peak"]
    eager = bg.estimate_terms(lengths, L, d, h, V, b, e, True, response_lengths=resp, intermediate=I, eager=True)
    assert eager["update"] - t["update"] == 2 * L * b * h * S * S * e
    no_jvp = bg.estimate_terms(lengths, L, d, h, V, b, e, False, response_lengths=resp, intermediate=I)
    assert no_jvp["jvp"] == 0 and no_jvp["update"] == t["update"]


def test_scaling_with_length_and_micro_batch():
    def jvp(S, mb=1, n=1):
        return bg.estimate_terms([S] * n, 1, 8, 16, 10, mb, 4, True)["jvp"]

    def attention(S):
        return 6 * 16 * S * S * 4
    assert jvp(4000) - jvp(2000) > 0.99 * (attention(4000) - attention(2000))  # quadratic in S
    assert jvp(1000, mb=4, n=2) == jvp(1000, mb=2, n=2)  # b = min(micro_batch, sequences)
    assert jvp(1000, mb=2, n=2) == pytest.approx(2 * jvp(1000), rel=1e-9)
    assert bg.estimate_peak_bytes([], 1, 8, 2, 10, 1, 4, True) == 0


def test_the_reported_blow_up_is_estimated_above_what_killed_it():
    """A 12k-token response on a 1-layer SmolLM2-shaped model grew past 24 GB and was killed."""
    est = bg.estimate_peak_bytes([12_050], 1, 576, 9, 49_152, 4, 4, True, response_lengths=[12_000],
                                 intermediate=1536, n_params=35_000_000)
    assert est > 24 * 2**30
    short = bg.estimate_peak_bytes([350] * 8, 30, 576, 9, 49_152, 4, 4, True, response_lengths=[300] * 8,
                                   intermediate=1536, n_params=135_000_000)
    assert short < 16 * 2**30  # the shipped rollouts on the bundled model fit on an ordinary machine


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_update_estimate_bounds_the_measured_peak(attn):
    """Live-tensor accounting of the real update on a tiny model: estimate (update term + the
    gradient and pre-step copies) between 1 and 2 times the measured peak."""
    model = make_model(attn=attn)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, 37, (6,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(7, 37, (n,), generator=g).tolist() for n in (100, 60, 110, 20)]
    packed = pack(prompts, responses, 0)
    loss_fn = grpo_token_mean_loss(response_stats(model, packed)["logp"], torch.where(packed.mask, 1.0, 0.0), packed.mask)
    measured = live_peak_bytes(lambda: one_step_update(model, packed, loss_fn, 1e-3, "sgd", micro_batch=2))
    d = bg.model_dims(model)
    t = bg.estimate_terms([6 + len(r) for r in responses], d["n_layers"], d["hidden"], d["n_heads"], d["vocab"], 2,
                          d["dtype_bytes"], False, response_lengths=[len(r) for r in responses],
                          intermediate=d["intermediate"], n_params=d["n_params"], eager=attn == "eager",
                          closed_form_head=True)  # the update's default head path for this linear head
    estimate = t["update"] + 2 * d["n_params"] * d["dtype_bytes"]
    assert measured <= estimate <= 2 * measured, (measured, estimate)


def test_available_memory_from_meminfo_and_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n")
    assert bg.parse_meminfo(meminfo.read_text()) == 20_000_000 * 1024
    assert bg.parse_meminfo("MemTotal: 1 kB\n") is None
    cg = tmp_path / "cg"
    cg.mkdir()
    assert bg.available_memory_bytes(meminfo=meminfo, cgroup=cg) == 20_000_000 * 1024  # no cgroup files
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("5\n")
    assert bg.available_memory_bytes(meminfo=meminfo, cgroup=cg) == 20_000_000 * 1024  # no limit
    (cg / "memory.max").write_text(str(8 * 2**30))
    (cg / "memory.current").write_text(str(2**30))
    assert bg.available_memory_bytes(meminfo=meminfo, cgroup=cg) == 7 * 2**30  # the container's limit
    assert bg.available_memory_bytes(meminfo=tmp_path / "absent", cgroup=tmp_path / "absent") is None
    assert bg.available_memory_bytes(meminfo=tmp_path / "absent", cgroup=cg) == 7 * 2**30


def test_model_dims_read_defensively():
    model = make_model()
    d = bg.model_dims(model)
    assert (d["n_layers"], d["hidden"], d["n_heads"], d["vocab"], d["intermediate"], d["dtype_bytes"]) == (2, 32, 4, 48, 64, 4)
    assert d["n_params"] == sum(p.numel() for p in model.parameters())

    class Bare(torch.nn.Module):  # no config: sizes unknown, no check
        pass

    assert bg.model_dims(Bare()) is None
    assert bg.check_budget([10_000], Bare(), 4, True, available=1) is None


def test_check_budget_message_names_sequence_estimate_and_memory():
    model = make_model()
    lengths, resp = [50, 4000, 70], [40, 3990, 60]
    est = bg.check_budget(lengths, model, 4, True, response_lengths=resp, available=2**40)
    assert est is not None and est > 0
    with pytest.raises(ValueError) as info:
        bg.check_budget(lengths, model, 4, True, response_lengths=resp, available=100 * MiB)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in ("validate: not enough memory", "row 1: 4000 tokens, 3990 of them response", "GiB",
                   "100 MiB is available", "--micro-batch", "--max-len", "--no-jvp"):
        assert needle in msg, msg
    with pytest.raises(ValueError, match="use a smaller --max-len$"):  # micro-batch 1, no JVP: only --max-len helps
        bg.check_budget([200_000], model, 1, False, available=MiB, what="compare --measure")


def _frame(rows=None):
    return validate_rollouts(pd.DataFrame(rows or arithmetic_rows()), "r.jsonl")


def _no_forward(*a, **k):
    raise AssertionError("the model ran although the budget check should have refused first")


def test_validate_refuses_before_any_forward(tiny_tokenizer, monkeypatch):
    import entropy_lens.pipelines.validate as va

    monkeypatch.setattr(bg, "available_memory_bytes", lambda *a, **k: 10 * MiB)
    monkeypatch.setattr(va, "response_stats", _no_forward)
    with pytest.raises(ValueError, match="validate: not enough memory"):
        run_validate(make_model(), tiny_tokenizer, _frame(), ValidateSettings(lr=0.05), "r.jsonl")
    monkeypatch.undo()
    monkeypatch.setattr(bg, "available_memory_bytes", lambda *a, **k: None)  # unknown: no check
    frame, summary = run_validate(make_model(), tiny_tokenizer, _frame(), ValidateSettings(lr=0.05, jvp=False))
    assert len(frame) == summary["n_tokens"]


def test_compare_measure_refuses_before_any_forward(tiny_tokenizer, monkeypatch):
    import entropy_lens.pipelines.compare as cmp

    monkeypatch.setattr(bg, "available_memory_bytes", lambda *a, **k: 10 * MiB)
    monkeypatch.setattr(cmp, "instrument", _no_forward)
    with pytest.raises(ValueError, match="compare --measure: not enough memory"):
        cmp.measure_methods(make_model(), tiny_tokenizer, _frame(), ["grpo"], None, ValidateSettings(lr=0.05))


def test_max_len_truncates_responses_with_a_note(tiny_tokenizer):
    rows = arithmetic_rows()
    for r in rows:
        r["prompt_ids"] = [2, 4, 10, 3, 2, 5]
        r["response_ids"] = tiny_tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        r["old_logp"] = [-1.0 - j for j in range(len(r["response_ids"]))]
    frame = _frame(rows)
    full = prepare(frame, tiny_tokenizer, "r.jsonl")
    cut = prepare(frame, tiny_tokenizer, "r.jsonl", max_len=6)
    assert max(full.lengths) > 6 and max(cut.lengths) == 6
    assert cut.tok.response_ids == [r[:6] for r in full.tok.response_ids]
    assert cut.old_logp.shape == (len(rows), 6)
    torch.testing.assert_close(cut.old_logp, full.old_logp[:, :6])
    n_cut = sum(n > 6 for n in full.lengths)
    assert any(f"{n_cut} of {len(rows)} responses truncated to max_len=6" in n for n in cut.tok.notes)
    assert prepare(frame, tiny_tokenizer, "r.jsonl", max_len=100).tok.notes == full.tok.notes  # nothing to cut
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_len must be an integer >= 1"):
            prepare(frame, tiny_tokenizer, "r.jsonl", max_len=bad)


def test_validate_with_max_len(tiny_tokenizer):
    frame, summary = run_validate(make_model(), tiny_tokenizer, _frame(), ValidateSettings(lr=0.05, jvp=False, max_len=4))
    assert frame["pos"].max() == 3 and summary["settings"]["max_len"] == 4
    assert any("truncated to max_len=4" in n for n in summary["notes"])


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 9), (torch.bfloat16, 11)])
def test_validate_keeps_few_copies_of_the_parameters(tiny_tokenizer, dtype, bound):
    """Live-tensor accounting of validate's step (no JVP) on a model whose parameters dominate its
    activations: the bytes alive above the weights stay below ``bound`` per parameter (fp32: θ, the
    gradient and Δθ, 8 B + scratch; bf16: θ in bf16, the fp32 master, its gradient or Δθ, the fp32
    measuring copy, 10 B + scratch), the regime the budget's parameter term describes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    P = sum(p.numel() for p in model.parameters())
    frame = validate_rollouts(pd.DataFrame(arithmetic_rows()[:4]), "rows")
    settings = ValidateSettings(lr=1e-4, optimizer="sgd", jvp=False)
    peak = live_peak_bytes(lambda: run_validate(model, tiny_tokenizer, frame, settings))
    assert 0.5 * bound * P < peak < bound * P, peak / P
    assert bg.estimate_terms([40] * 4, 4, 384, 6, len(tiny_tokenizer), 4, torch.finfo(dtype).bits // 8, False,
                             n_params=P)["params"] >= P * torch.finfo(dtype).bits // 8 + peak
