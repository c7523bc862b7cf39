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
    """Training sequences, each a shared prefix plus its own suffix.

    The ``group_size`` samples of one problem start with the same prompt. Its forward and
    backward run once per prefix, not once per sample: causal attention makes the prompt's
    hidden states identical in every copy, so this is the same computation with G-1 copies
    of the prompt left out (bench-arith: 64 x 55 tokens -> 16 x 39 + 64 x 17).

    A sequence is split just before its first action token's predecessor: the prefix holds
    the tokens before that, the suffix starts with the token that predicts the first action.
    Prefixes are left-padded ``[P, L]``; suffixes right-padded ``[B, T]``; sequence b
    continues prefix ``prefix_index_B[b]``. Position t of ``action_mask_BT`` marks that suffix
    token t is an action, predicted from suffix position t-1.
    """

    prefix_ids_PL: torch.Tensor
    prefix_mask_PL: torch.Tensor
    prefix_index_B: torch.Tensor
    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    action_mask_BT: torch.Tensor  # float
    sample_logprobs_BT: torch.Tensor
    advantages_B: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    def slice(self, start: int, stop: int) -> Batch:
        """Sequences ``start:stop`` with just the prefixes they use."""
        return self.select(list(range(start, stop)))

    def select(self, rows: list[int]) -> Batch:
        """Sequences ``rows`` (in that order) with just the prefixes they use, padding trimmed."""
        ix = torch.tensor(rows, dtype=torch.long)
        used_U, index_B = torch.unique(self.prefix_index_B[ix], return_inverse=True)
        # padding only as wide as these rows need
        width = int(self.attention_mask_BT[ix].sum(-1).max())
        skip = int((self.prefix_mask_PL[used_U].sum(0) == 0).long().cumprod(0).sum())
        return Batch(
            self.prefix_ids_PL[used_U, skip:], self.prefix_mask_PL[used_U, skip:], index_B,
            self.input_ids_BT[ix, :width], self.attention_mask_BT[ix, :width],
            self.action_mask_BT[ix, :width], self.sample_logprobs_BT[ix, :width], self.advantages_B[ix],
        )  # fmt: skip

    def micro_batches(self, max_tokens: int) -> list[tuple[int, int]]:
        """Consecutive row ranges of at most ``max_tokens`` tokens each, at least one row each:
        every prefix counted once, as the forward computes it, and the suffixes as the forward
        sees them, padded to the longest of the range (one long multi-turn episode among short
        ones would otherwise pad them all). Activation memory is bounded by tokens, whatever
        the mix of short and long sequences."""
        lengths_B = self.attention_mask_BT.sum(-1).tolist()
        prefix_P = self.prefix_mask_PL.sum(-1).tolist()
        ranges: list[tuple[int, int]] = []
        start, prefixes, longest, seen = 0, 0, 0, set[int]()
        for b, (length, p) in enumerate(zip(lengths_B, self.prefix_index_B.tolist(), strict=True)):
            grown = prefixes + (0 if p in seen else prefix_P[p]) + (b - start + 1) * max(longest, length)
            if b > start and grown > max_tokens:
                ranges.append((start, b))
                start, prefixes, longest, seen = b, 0, 0, set()
            prefixes += 0 if p in seen else prefix_P[p]
            longest = max(longest, length)
            seen.add(p)
        ranges.append((start, len(lengths_B)))
        return ranges

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in vars(self).values()))


def collate(datums: Sequence[Datum], pad_token_id: int, share_prefix: bool = True) -> Batch:
    """Pad datums into a Batch, sharing identical prefixes (see ``Batch``); without
    ``share_prefix`` every sequence is one suffix (gradient checkpointing cannot keep the
    prefix's key/value cache, and SFT sequences rarely share one)."""
    prefixes: dict[tuple[int, ...], int] = {}
    index, suffixes = [], []
    for d in datums:
        first_action = next((t for t, a in enumerate(d.action_mask_T) if a), len(d.tokens_T))
        cut = max(first_action - 1, 0) if share_prefix else 0
        index.append(prefixes.setdefault(d.tokens_T[:cut], len(prefixes)))
        suffixes.append((d.tokens_T[cut:], d.action_mask_T[cut:], d.sample_logprobs_T[cut:]))
    width = max(len(p) for p in prefixes)
    prefix_ids = torch.full((len(prefixes), width), pad_token_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for u, p in enumerate(prefixes):
        if p:
            prefix_ids[u, width - len(p) :] = torch.tensor(p)
            prefix_mask[u, width - len(p) :] = 1
    length = max(len(t) for t, _, _ in suffixes)
    n = len(datums)
    ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attn = torch.zeros((n, length), dtype=torch.long)
    act = torch.zeros((n, length))
    slp = torch.zeros((n, length))
    for i, (tokens, mask, logps) in enumerate(suffixes):
        t = len(tokens)
        ids[i, :t] = torch.tensor(tokens)
        attn[i, :t] = 1
        act[i, :t] = torch.tensor(mask, dtype=torch.float)
        slp[i, :t] = torch.tensor(logps)
    act[:, 0] = 0.0  # the suffix's first token is predicted by the prefix: never an action here
    advantages = torch.tensor([d.advantage for d in datums])
    return Batch(prefix_ids, prefix_mask, torch.tensor(index), ids, attn, act, slp, advantages)


class ActionScorer(torch.nn.Module):
    """The policy's :func:`action_logprobs` as a module's forward.

    Data-parallel wrappers act through ``forward``: DDP prepares its gradient reduction there,
    FSDP2 gathers the root's parameters (embeddings, final norm, LM head) around it. The
    trainer wraps this module, never the policy's inner parts, and calls it.
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(
        self, *tensors: torch.Tensor, temperature: float = 1.0, entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return action_logprobs(self.policy, Batch(*tensors), temperature, entropy=entropy)


def score(
    scorer: torch.nn.Module, batch: Batch, temperature: float = 1.0, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_BT, entropy_BT) of ``batch``'s actions through ``scorer`` (an :class:`ActionScorer`,
    possibly wrapped in DDP or sharded by FSDP2)."""
    return scorer(*vars(batch).values(), temperature=temperature, entropy=entropy)  # type: ignore[no-any-return]


def action_logprobs(
    model: torch.nn.Module, batch: Batch, temperature: float = 1.0, chunk: int = 128, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_BT, entropy_BT) of the action tokens under ``model``; zero elsewhere.

    Runs the transformer body once per prefix and once over the suffixes (attending to their
    prefix's keys and values), then the LM head only on the positions that predict an
    action, a few rows at a time: never a full [B, T, vocab] logits tensor.
    """
    from transformers import DynamicCache

    from mathrl.models import base_of, cache_kwarg

    base = base_of(model)
    prefix_len_P = batch.prefix_mask_PL.sum(-1)
    cache, mask_BT = None, batch.attention_mask_BT
    if batch.prefix_ids_PL.shape[1] > 0:
        cache = DynamicCache()
        positions_PL = (batch.prefix_mask_PL.cumsum(-1) - 1).clamp(min=0)
        base.model(
            input_ids=batch.prefix_ids_PL, attention_mask=batch.prefix_mask_PL, position_ids=positions_PL,
            use_cache=True, **{cache_kwarg(base.model): cache},
        )  # fmt: skip
        cache.batch_select_indices(batch.prefix_index_B)  # differentiable: gradients sum over the copies
        mask_BT = torch.cat([batch.prefix_mask_PL[batch.prefix_index_B], batch.attention_mask_BT], dim=1)
    positions_BT = prefix_len_P[batch.prefix_index_B][:, None] + torch.arange(
        batch.input_ids_BT.shape[1], device=batch.input_ids_BT.device
    )
    hidden_BTH = base.model(
        input_ids=batch.input_ids_BT, attention_mask=mask_BT, position_ids=positions_BT,
        use_cache=cache is not None, **{cache_kwarg(base.model): cache},
    ).last_hidden_state  # fmt: skip
    pred_mask_BT = batch.action_mask_BT[:, 1:] > 0  # position t-1 predicts token t
    hidden_NH = hidden_BTH[:, :-1][pred_mask_BT]
    targets_N = batch.input_ids_BT[:, 1:][pred_mask_BT]
    logps, ents = [], []
    for s in range(0, hidden_NH.shape[0], chunk):
        logits_NV = base.lm_head(hidden_NH[s : s + chunk]).float()
        if temperature != 1.0:
            logits_NV = logits_NV / max(temperature, 1e-6)
        logp_NV = torch.log_softmax(logits_NV, dim=-1)
        logps.append(logp_NV.gather(-1, targets_N[s : s + chunk, None]).squeeze(-1))
        if entropy:
            with torch.no_grad():
                ents.append(-(logp_NV.exp() * logp_NV).sum(-1))
    logp_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32, device=hidden_BTH.device)
    ent_BT = torch.zeros_like(logp_BT)
    full_mask_BT = torch.zeros_like(batch.action_mask_BT, dtype=torch.bool)
    full_mask_BT[:, 1:] = pred_mask_BT
    if logps:
        logp_BT = logp_BT.masked_scatter(full_mask_BT, torch.cat(logps))
    if ents:
        ent_BT = ent_BT.masked_scatter(full_mask_BT, torch.cat(ents))
    return logp_BT, ent_BT
