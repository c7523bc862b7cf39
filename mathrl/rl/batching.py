"""Trajectories -> padded training tensors, and the trainer's logprobs of the action tokens.

A trajectory becomes one sequence when each turn's prompt extends the previous turn's
prompt + answer (the usual case for chat templates); otherwise it is split into several
sequences at the turns where the prefix breaks. Only action tokens carry loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mathrl.types import Trajectory


@dataclass(frozen=True)
class Datum:
    """One training sequence: tokens, which of them are actions, their sampling logprobs."""

    tokens_T: tuple[int, ...]
    action_mask_T: tuple[bool, ...]
    sample_logprobs_T: tuple[float, ...]
    advantage: float


def trajectory_datums(traj: Trajectory, advantage: float) -> list[Datum]:
    """Split/merge a trajectory's turns into training sequences (see module docstring)."""
    datums: list[Datum] = []
    tokens: list[int] = []
    mask: list[bool] = []
    logps: list[float] = []
    for tr in traj.transitions:
        ob = list(tr.ob_tokens_T)
        if tokens and ob[: len(tokens)] == tokens:
            new = ob[len(tokens) :]
        else:
            if tokens:
                datums.append(Datum(tuple(tokens), tuple(mask), tuple(logps), advantage))
            tokens, mask, logps, new = [], [], [], ob
        tokens += new
        mask += [False] * len(new)
        logps += [0.0] * len(new)
        tokens += tr.ac.tokens_T
        mask += [True] * len(tr.ac.tokens_T)
        logps += tr.ac.logprobs_T
    if tokens:
        datums.append(Datum(tuple(tokens), tuple(mask), tuple(logps), advantage))
    return datums


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors. Position t of ``action_mask_BT`` marks that token t is an action,
    predicted from position t-1."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    action_mask_BT: torch.Tensor  # float
    sample_logprobs_BT: torch.Tensor
    advantages_B: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(*(t[start:stop] for t in vars(self).values()))


def collate(datums: Sequence[Datum], pad_token_id: int) -> Batch:
    length = max(len(d.tokens_T) for d in datums)
    n = len(datums)
    ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attn = torch.zeros((n, length), dtype=torch.long)
    act = torch.zeros((n, length))
    slp = torch.zeros((n, length))
    for i, d in enumerate(datums):
        t = len(d.tokens_T)
        ids[i, :t] = torch.tensor(d.tokens_T)
        attn[i, :t] = 1
        act[i, :t] = torch.tensor(d.action_mask_T, dtype=torch.float)
        slp[i, :t] = torch.tensor(d.sample_logprobs_T)
    act[:, 0] = 0.0  # nothing predicts the first token
    return Batch(ids, attn, act, slp, torch.tensor([d.advantage for d in datums]))


def action_logprobs(
    model: torch.nn.Module, batch: Batch, temperature: float = 1.0, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_BT, entropy_BT) of the action tokens under ``model``; zero elsewhere.

    Runs the transformer body once, then the LM head only on the positions that predict
    an action, in chunks: never a full [B, T, vocab] logits tensor.
    """
    from mathrl.models import base_of

    base = base_of(model)
    hidden_BTH = base.model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).last_hidden_state
    pred_mask_BT = batch.action_mask_BT[:, 1:] > 0  # position t-1 predicts token t
    hidden_NH = hidden_BTH[:, :-1][pred_mask_BT]
    targets_N = batch.input_ids_BT[:, 1:][pred_mask_BT]
    logps, ents = [], []
    for s in range(0, hidden_NH.shape[0], chunk):
        logits_NV = base.lm_head(hidden_NH[s : s + chunk]).float() / max(temperature, 1e-6)
        logp_NV = torch.log_softmax(logits_NV, dim=-1)
        logps.append(logp_NV.gather(-1, targets_N[s : s + chunk, None]).squeeze(-1))
        ents.append(-(logp_NV.exp() * logp_NV).sum(-1).detach())
    logp_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
    ent_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
    full_mask_BT = torch.zeros_like(batch.action_mask_BT, dtype=torch.bool)
    full_mask_BT[:, 1:] = pred_mask_BT
    if logps:
        logp_BT = logp_BT.masked_scatter(full_mask_BT, torch.cat(logps))
        ent_BT = ent_BT.masked_scatter(full_mask_BT, torch.cat(ents))
    return logp_BT, ent_BT
