"""TokenBatch: the one per-token data model.

Every per-token quantity is a ``[B, T]`` tensor aligned with the *response* tokens, right-padded,
with a boolean ``mask`` (True on valid response tokens). Per-sequence quantities are ``[B]``.
Units: log-probabilities and entropies in nats, at the sampling temperature ``meta['temperature']``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

#: Per-token tensor fields of a TokenBatch, in frame column order.
TOKEN_FIELDS = ("logp", "old_logp", "entropy", "sum_p2", "sum_p2_logp", "adv")
#: Optional per-token fields (``None`` when not recorded); frame columns of the same name.
OPTIONAL_TOKEN_FIELDS = ("old_entropy", "ref_logp", "omega_lm_head", "omega_lm_head_source")


@dataclass(frozen=True)
class TokenBatch:
    """Per-token statistics of a batch of responses.

    Shapes: ``token_ids, mask, logp, old_logp, entropy, sum_p2, sum_p2_logp, adv``: ``[B, T]``;
    ``group_id, reward``: ``[B]``. ``logp``/``old_logp``: log π(a|s) of the sampled token under the
    current / the behaviour policy (nats). ``entropy``: H(π(·|s)) (nats). ``sum_p2``: Σ_v π_v²;
    ``sum_p2_logp``: Σ_v π_v² log π_v (nats). ``adv``: the token's advantage.

    Optional (``None`` when not recorded), ``[B, T]``: ``old_entropy``: H(π_old(·|s)), the
    entropy recorded with ``old_logp`` at θ_old (nats; STEER's reference ω reads it);
    ``ref_logp``: log π_ref(a|s) of the sampled token under the reference policy (nats; ``kl_ref``);
    ``omega_lm_head``: the LM-head kernel score of the token, the first-order entropy change of an
    SGD step of the LM head alone per unit η/L (nats; docs/attribution.md eq. 8 without η/L; STEER's
    ``omega=lm_head`` reads it); ``omega_lm_head_source``: the change of the batch's summed entropy
    from this token's own share of that step (eq. 12 without η/L; ``omega=lm_head_source``). Where the batch itself is at θ_old (analyze, compare), ``old_entropy`` equals ``entropy``.
    """

    token_ids: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    old_logp: torch.Tensor
    entropy: torch.Tensor
    sum_p2: torch.Tensor
    sum_p2_logp: torch.Tensor
    adv: torch.Tensor
    group_id: torch.Tensor
    reward: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    old_entropy: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    omega_lm_head: torch.Tensor | None = None
    omega_lm_head_source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.mask.shape)
        if len(shape) != 2:
            raise ValueError(f"TokenBatch.mask must be [B, T], got {shape}")
        if self.mask.dtype != torch.bool:
            raise ValueError("TokenBatch.mask must be a bool tensor")
        for name in ("token_ids",) + TOKEN_FIELDS:
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"TokenBatch.{name} has shape {tuple(t.shape)}, mask has {shape}")
        for name in OPTIONAL_TOKEN_FIELDS:
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"TokenBatch.{name} has shape {tuple(t.shape)}, mask has {shape}")
        for name in ("group_id", "reward"):
            t = getattr(self, name)
            if tuple(t.shape) != shape[:1]:
                raise ValueError(f"TokenBatch.{name} must be [B]={shape[:1]}, got {tuple(t.shape)}")

    @property
    def n_tokens(self) -> int:
        """Number of valid response tokens (L of the token-mean normaliser)."""
        return int(self.mask.sum())

    @property
    def ratio(self) -> torch.Tensor:
        """Importance ratio r = π/π_old = exp(logp − old_logp), ``[B, T]`` (1 on padding)."""
        return torch.exp(torch.where(self.mask, self.logp - self.old_logp, 0.0))

    def replace(self, **changes: Any) -> "TokenBatch":
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    def to_frame(
        self,
        extra: dict[str, torch.Tensor] | None = None,
        token_text: list[list[str]] | None = None,
    ) -> pd.DataFrame:
        """Long frame: one row per valid response token.

        Columns: ``sample, group, pos, token_id, [token], logp, old_logp, entropy, sum_p2,
        sum_p2_logp, adv, [old_entropy], [ref_logp], [omega_lm_head], [omega_lm_head_source], reward`` (the optional fields when recorded)
        plus every ``extra`` ``[B, T]`` tensor under its key.
        ``token_text[b][t]`` gives the decoded text of token t of response b, if provided.
        """
        m = self.mask.cpu()
        b_idx, t_idx = torch.nonzero(m, as_tuple=True)
        cols: dict[str, Any] = {
            "sample": b_idx.numpy().astype(np.int64),
            "group": self.group_id.cpu()[b_idx].numpy().astype(np.int64),
            "pos": t_idx.numpy().astype(np.int64),
            "token_id": self.token_ids.cpu()[m].numpy().astype(np.int64),
        }
        if token_text is not None:
            cols["token"] = [token_text[b][t] for b, t in zip(b_idx.tolist(), t_idx.tolist())]
        for name in TOKEN_FIELDS + OPTIONAL_TOKEN_FIELDS:
            t = getattr(self, name)
            if t is not None:
                cols[name] = t.detach().cpu()[m].double().numpy()
        cols["reward"] = self.reward.cpu()[b_idx].double().numpy()
        for name, t in (extra or {}).items():
            if tuple(t.shape) != tuple(m.shape):
                raise ValueError(f"extra column {name!r} has shape {tuple(t.shape)}, expected {tuple(m.shape)}")
            v = t.detach().cpu()[m]
            cols[name] = v.numpy() if v.dtype == torch.bool else v.double().numpy()
        return pd.DataFrame(cols)

    @classmethod
    def from_frame(
        cls, df: pd.DataFrame, meta: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> "TokenBatch":
        """Inverse of :meth:`to_frame` for the TokenBatch fields (extra columns are ignored; the
        optional fields are read when their columns are present).

        Rows are placed by ``sample`` (0..B−1) and ``pos``; missing positions become padding.
        Float fields get ``dtype`` (float64 when batch sums must not cancel).
        """
        need = {"sample", "group", "pos", "token_id", *TOKEN_FIELDS}
        missing = sorted(need - set(df.columns))
        if missing:
            raise ValueError(f"token frame lacks columns: {', '.join(missing)}")
        sample = torch.tensor(df["sample"].to_numpy(np.int64))
        pos = torch.tensor(df["pos"].to_numpy(np.int64))
        B = int(sample.max()) + 1 if len(df) else 0
        T = int(pos.max()) + 1 if len(df) else 0
        mask = frame_grid(df, None, (B, T), torch.bool)

        def grid(col: str, dtype: torch.dtype) -> torch.Tensor:
            return frame_grid(df, col, (B, T), dtype)

        group_id = torch.zeros(B, dtype=torch.long)
        group_id[sample] = torch.tensor(df["group"].to_numpy(np.int64))
        reward = torch.zeros(B, dtype=dtype)
        if "reward" in df.columns:
            reward[sample] = torch.tensor(df["reward"].to_numpy(np.float64)).to(dtype)
        return cls(
            token_ids=grid("token_id", torch.long),
            mask=mask,
            **{name: grid(name, dtype) for name in TOKEN_FIELDS},
            group_id=group_id,
            reward=reward,
            meta=dict(meta or {}),
            **{name: grid(name, dtype) for name in OPTIONAL_TOKEN_FIELDS if name in df.columns},
        )


def frame_grid(df: pd.DataFrame, column: str | None, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Column ``column`` of a long token frame placed on a ``[B, T]`` grid by its ``sample`` and
    ``pos`` columns (0 elsewhere); ``column`` None gives the bool mask of the rows present."""
    b = torch.from_numpy(df["sample"].to_numpy(np.int64, copy=True))
    t = torch.from_numpy(df["pos"].to_numpy(np.int64, copy=True))
    out = torch.zeros(shape, dtype=dtype)
    if column is None:
        out[b, t] = True
    else:
        out[b, t] = torch.from_numpy(np.array(df[column].to_numpy(), copy=True)).to(dtype)
    return out


def tensor_field_names() -> list[str]:
    """Names of all tensor fields of TokenBatch (the optional ones included)."""
    return [f.name for f in fields(TokenBatch) if f.name != "meta"]
