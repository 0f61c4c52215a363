"""The attribution of dh_jvp and the LM-head kernel estimators (docs/attribution.md): exact sums,
finite-difference goldens, chunk invariance, and the LM-head-only model where eq. 8 is exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import arithmetic_rows, make_model, make_tokenizer

from entropy_lens import attribution as att
from entropy_lens.io.rollouts import validate_rollouts
from entropy_lens.pipelines.attribute import (
    AttributeSettings,
    check_advantages,
    check_splits,
    run_attribute,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is many times faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _head_problem(seed: int = 0, n: int = 7, d: int = 5, v: int = 11, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = 0.8 * torch.randn(v, d, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    coef = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, b, ids, coef


def _entropy(hidden, weight, bias, tau):
    z = hidden @ weight.T + (bias if bias is not None else 0.0)
    logq = torch.log_softmax(z / tau, -1)
    return -(logq.exp() * logq).sum(-1)


def _sgd_head_step(hidden, weight, bias, ids, coef, lr, n_tokens, tau):
    """One real SGD step of the head on −(1/L)Σ c_k log π_k(y_k) (the surrogate's gradient at r = 1)."""
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True) if bias is not None else None
    z = hidden @ w.T + (b if b is not None else 0.0)
    logp = torch.log_softmax(z / tau, -1).gather(-1, ids[:, None]).squeeze(-1)
    (-(coef * logp).sum() / n_tokens).backward()
    with torch.no_grad():
        return w - lr * w.grad, (b - lr * b.grad if b is not None else None)


def test_param_groups_and_kinds():
    assert att.param_group("model.embed_tokens.weight") == "embed"
    assert att.param_group("model.layers.3.self_attn.q_proj.weight") == "block3.attn"
    assert att.param_group("model.layers.12.mlp.down_proj.weight") == "block12.mlp"
    assert att.param_group("model.layers.0.post_attention_layernorm.weight") == "block0.norm"
    assert att.param_group("model.norm.weight") == "final_norm"
    assert att.param_group("lm_head.weight") == "lm_head"
    assert att.param_group("transformer.h.2.attn.c_attn.weight") == "block2.attn"
    assert att.group_kind("block3.attn") == "attn" and att.group_kind("lm_head") == "lm_head"
    groups = {n: att.param_group(n) for n in ["lm_head.weight", "model.layers.10.mlp.w", "model.layers.2.mlp.w",
                                               "model.embed_tokens.weight", "model.norm.weight"]}
    assert list(att.split_by_group(list(groups), groups)) == ["embed", "block2.mlp", "block10.mlp", "final_norm", "lm_head"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_lm_head_chunks_equal_the_gram_reference(bias, tau):
    h, w, b, ids, c = _head_problem(bias=bias)
    ref = att.dh_lm_head_reference(h, w, b, ids, c, 0.1, 9, tau)
    for rows in (1, 3, 7, 100):  # the chunk size never changes the result
        got = att.dh_lm_head(h, w, b, ids, c, 0.1, 9, tau, chunk_rows=rows)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    assert float(ref.abs().max()) > 1e-4


@pytest.mark.parametrize("bias", [False, True])
def test_lm_head_matches_finite_differences(bias):
    """Golden: H after a real SGD step of the head minus H before, error O(η²)."""
    h, w, b, ids, c = _head_problem(seed=1, bias=bias)
    tau, L = 0.9, 10
    pred = att.dh_lm_head(h, w, b, ids, c, 1.0, L, tau, chunk_rows=3)
    errs = []
    for lr in (1e-3, 5e-4):
        w2, b2 = _sgd_head_step(h, w, b, ids, c, lr, L, tau)
        fd = _entropy(h, w2, b2, tau) - _entropy(h, w, b, tau)
        errs.append(float((fd - lr * pred).abs().max()))
        assert errs[-1] < 1e-3 * float(fd.abs().max())
    assert 3.0 < errs[0] / errs[1] < 5.0  # second order: halving η quarters the error


def test_self_kernel_is_the_diagonal_of_the_gram_form():
    """eq. 9: the k = j term of eq. 6 equals ‖h̃_j‖²/τ² times the all-logit form."""
    from entropy_lens.estimators import dh_all_logit

    h, w, b, ids, c = _head_problem(seed=2, bias=True)
    tau, lr, L = 0.8, 0.3, 7
    diag = torch.stack([att.dh_lm_head_reference(h[j:j + 1], w, b, ids[j:j + 1], c[j:j + 1], lr, L, tau)[0]
                        for j in range(h.shape[0])])
    z = (h @ w.T + b) / tau
    logq = torch.log_softmax(z, -1)
    q = logq.exp()
    ent = -(q * logq).sum(-1)
    logp = logq.gather(-1, ids[:, None]).squeeze(-1)
    al = dh_all_logit(logp, ent, (q * q).sum(-1), (q * q * logq).sum(-1), c, 1.0, 1.0, lr, L)
    got = att.dh_self_kernel(al, (h * h).sum(-1) + 1.0, tau)
    torch.testing.assert_close(got, diag, rtol=1e-10, atol=1e-15)


def test_step_scale_and_residual():
    d = torch.tensor([-0.2, 0.0, 0.3])
    g = torch.tensor([2.0, 0.0, -3.0])
    torch.testing.assert_close(att.step_scale(d, g), torch.tensor([-0.1, 0.0, -0.1]))
    total = torch.tensor([1.0, -2.0])
    assert att.parts_residual({"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([0.5, -1.0])}, total) == 0.0
    assert att.parts_residual({"a": torch.tensor([0.0, -2.5])}, total) == pytest.approx(0.5)


def test_part_table_values():
    parts = pd.DataFrame({"own": [1.0, -1.0, 2.0], "other": [1.0, 0.0, 0.0]})
    t = att.part_table(parts, parts.sum(1).to_numpy(), pd.Series([1, 1, 4]).to_numpy())
    assert t["own"]["share_abs"] == pytest.approx(4 / 5) and t["other"]["share_abs"] == pytest.approx(1 / 5)
    assert t["own"]["sum"] == pytest.approx(2.0) and t["own"]["share_total"] == pytest.approx(2 / 3)
    assert t["own"]["by_receiver"]["Q1"] == pytest.approx(0.0) and t["own"]["by_receiver"]["Q4"] == pytest.approx(2.0)


def test_bad_splits_and_zero_advantages():
    check_splits(("layer", "source"))
    with pytest.raises(ValueError, match="unknown part 'heads'"):
        check_splits(("layer", "heads"))
    with pytest.raises(ValueError, match="every advantage is zero"):
        check_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    check_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------
# The pipeline on tiny models (float64)
# ---------------------------------------------------------------------------------------------


def _rollouts():
    return validate_rollouts(pd.DataFrame(arithmetic_rows(n_groups=3, n=3)), "<test>")


def _untied(model):
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return model


@pytest.fixture(scope="module")
def tied_run():
    model = make_model().double()
    s = AttributeSettings(lr=0.05, by=("layer", "kind", "source", "quadrant"), micro_batch=4)
    return run_attribute(model, make_tokenizer(), _rollouts(), s)


@pytest.mark.parametrize("kind", ["layer", "kind", "source", "quadrant"])
def test_parts_sum_to_dh_jvp(tied_run, kind):
    frame, parts, summary = tied_run
    assert summary["attribution"][kind]["residual"] < 1e-6
    wide = parts[parts["by"] == kind].pivot_table(index=["sample", "pos"], columns="part", values="dh", aggfunc="sum")
    total = frame.set_index(["sample", "pos"])["dh_jvp"].loc[wide.index]
    err = (wide.sum(axis=1) - total).abs().max() / total.abs().max()
    assert err < 1e-6 and total.abs().max() > 0


def test_tied_matrix_counts_in_both_roles(tied_run):
    _, parts, summary = tied_run
    layer = summary["attribution"]["layer"]["parts"]
    assert summary["tied_embeddings"] is True
    assert {"embed", "lm_head", "final_norm", "block0.attn", "block1.mlp"} <= set(layer)
    assert layer["lm_head"]["share_abs"] > 0 and layer["embed"]["share_abs"] > 0
    kind = summary["attribution"]["kind"]["parts"]
    assert kind["attn"]["sum"] == pytest.approx(layer["block0.attn"]["sum"] + layer["block1.attn"]["sum"], rel=1e-6)
    src = parts[parts["by"] == "source"]
    assert set(src["part"]) == set(att.SOURCE_PARTS) and set(summary["attribution"]["quadrant"]["parts"]) == set(att.QUADRANT_PARTS)


def test_estimator_rows_are_scored(tied_run):
    frame, _, summary = tied_run
    for name in ("dh_jvp", "dh_lm_head", "dh_self_kernel", "dh_all_logit"):
        s = summary["estimators"][name]
        assert {"pcc", "srcc", "sign_agreement", "total_ratio", "cost_seconds", "cost_vs_forward_backward"} <= set(s)
        assert name in frame.columns
    assert summary["estimators"]["dh_jvp"]["pcc"] > 0.95


def test_attribute_writes_the_steer_scores_of_both_roles(tied_run):
    """omega_lm_head = dh_lm_head per unit η/L; the source score sums to the same batch total."""
    frame, _, summary = tied_run
    L, lr = summary["n_tokens"], 0.05
    assert np.allclose(frame["omega_lm_head"] * lr / L, frame["dh_lm_head"], rtol=1e-12, atol=0)
    assert frame["omega_lm_head_source"].sum() == pytest.approx(frame["omega_lm_head"].sum(), rel=1e-9)
    assert not np.allclose(frame["omega_lm_head_source"], frame["omega_lm_head"])


def test_lm_head_estimator_is_exact_when_only_the_head_trains():
    model = _untied(make_model(seed=3).double())
    for n, p in model.named_parameters():
        p.requires_grad_(n == "lm_head.weight")
    frame, _, summary = run_attribute(model, make_tokenizer(), _rollouts(), AttributeSettings(lr=0.05, by=("layer",)))
    jvp, head = frame["dh_jvp"].to_numpy(), frame["dh_lm_head"].to_numpy()
    assert abs(jvp).max() > 1e-6
    assert abs(head - jvp).max() < 1e-6 * abs(jvp).max()
    assert list(summary["attribution"]["layer"]["parts"]) == ["lm_head"]


def test_source_parts_with_adamw_sum_to_the_real_step():
    model = _untied(make_model(seed=4).double())
    s = AttributeSettings(lr=1e-3, optimizer="adamw", by=("source",), micro_batch=5)
    _, parts, summary = run_attribute(model, make_tokenizer(), _rollouts(), s)
    assert summary["attribution"]["source"]["residual"] < 1e-6
    own = parts[(parts["by"] == "source") & (parts["part"] == "own")]["dh"].abs().sum()
    assert own > 0


def test_sgd_step_scale_is_minus_lr():
    """eq. 3 for SGD: D = Δθ/g = −η wherever g ≠ 0, so a source's part is exactly −η·g_s."""
    from entropy_lens.model.update import (
        grpo_token_mean_loss,
        one_step_update,
        restore,
        snapshot,
    )
    from entropy_lens.pipelines.attribute import batch_gradient, micro_slices
    from entropy_lens.pipelines.prepare import prepare
    from entropy_lens.pipelines.validate import instrument

    model = make_model(seed=5).double()
    s = AttributeSettings(lr=0.05, micro_batch=4)
    prep = prepare(_rollouts(), make_tokenizer())
    packed, batch, _ = instrument(model, prep, s)
    loss_fn = grpo_token_mean_loss(batch.old_logp, batch.adv, batch.mask)
    theta = snapshot(model)
    delta, _ = one_step_update(model, packed, loss_fn, s.lr, "sgd", micro_batch=4)
    restore(model, theta)
    g = batch_gradient(model, packed, loss_fn, micro_slices(torch.ones(prep.n_sequences, dtype=torch.bool), 4), 1.0)
    for n in delta:
        nz = g[n] != 0
        d = att.step_scale(delta[n], g[n])[nz]
        torch.testing.assert_close(d, torch.full_like(d, -s.lr), rtol=1e-6, atol=0)
