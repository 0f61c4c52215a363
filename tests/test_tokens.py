import pytest
import torch

from entropy_lens.tokens import TOKEN_FIELDS, TokenBatch


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    vals = {k: torch.where(mask, torch.randn(3, 4, generator=g), 0.0) for k in TOKEN_FIELDS}
    return TokenBatch(token_ids=torch.where(mask, torch.randint(0, 50, (3, 4), generator=g), 0), mask=mask,
                      group_id=torch.tensor([0, 0, 1]), reward=torch.tensor([1.0, -1.0, 1.0]), **vals)


def test_frame_round_trip_and_one_row_per_valid_token():
    b = _batch()
    extra = {"q": torch.arange(12.0).reshape(3, 4)}
    df = b.to_frame(extra=extra, token_text=[["a", "b", "c", "d"]] * 3)
    assert len(df) == 8 and list(df["sample"]) == [0, 0, 0, 1, 2, 2, 2, 2]
    assert list(df["token"][:3]) == ["a", "b", "c"] and list(df["q"][:4]) == [0.0, 1.0, 2.0, 4.0]
    back = TokenBatch.from_frame(df)
    assert torch.equal(back.mask, b.mask) and torch.equal(back.token_ids, b.token_ids)
    for k in TOKEN_FIELDS:
        assert torch.allclose(getattr(back, k), getattr(b, k))
    assert torch.equal(back.group_id, b.group_id) and torch.equal(back.reward, b.reward)
    assert b.n_tokens == 8


def test_shape_validation():
    b = _batch()
    with pytest.raises(ValueError, match="logp"):
        b.replace(logp=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="group_id"):
        b.replace(group_id=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="lacks columns"):
        TokenBatch.from_frame(b.to_frame().drop(columns=["entropy"]))


def test_ratio_is_one_on_padding():
    b = _batch()
    assert torch.all(b.ratio[~b.mask] == 1.0)
    assert torch.allclose(b.ratio[b.mask], torch.exp(b.logp - b.old_logp)[b.mask])
