"""One GRPO update (``mathrl.train.rl._update``) or SFT step on a tiny random Llama, in one
process or under ``torchrun``, for each case ``KIND:MODE:LORA_RANK`` given (kind rl or sft,
mode ddp or fsdp); rank 0 writes each case's weights to ``OUT_DIR/KIND-MODE-LORA_RANK.pt``.

tests/test_parallel.py runs it both ways and compares: data parallelism must give the update
one process computes on the same global batch. One launch runs every case (startup is most
of the cost).
Usage: python tests/dist_update.py OUT_DIR rl:ddp:4 rl:fsdp:0 ...
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mathrl import parallel
from mathrl.models import trained_weights, wrap_lora
from mathrl.rl.batching import ActionScorer, Datum, collate
from mathrl.train.rl import TrainConfig, _update, share_prefix
from mathrl.train.run import make_optimizer
from mathrl.train.sft import Example, train_step


def main(out_dir: str, cases: list[str]) -> None:
    world = parallel.init_world("cpu")
    for case in cases:
        kind, mode, lora = case.split(":")
        run_case(f"{out_dir}/{kind}-{mode}-{lora}.pt", kind, mode, int(lora), world)
    parallel.shutdown(world)


def run_case(out: str, kind: str, mode: str, lora_rank: int, world: parallel.World) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    torch.manual_seed(1)
    policy = wrap_lora(model, lora_rank)
    if lora_rank:  # non-zero B so the first step moves A too
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    policy.train()
    initial = {k: v.detach().clone() for k, v in trained_weights(policy).items()}
    scorer = parallel.wrap(ActionScorer(policy), mode, world, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    if kind == "rl":
        # 3 problems x 3 samples: shared prompts, different lengths, some negative advantages
        datums = []
        for problem in range(3):
            prompt = torch.randint(3, 97, (4 + 3 * problem,), generator=g).tolist()
            for sample in range(3):
                n = 2 + (problem + 2 * sample) % 5
                action = torch.randint(3, 97, (n,), generator=g).tolist()
                logps = (-torch.rand(n, generator=g) * 3).tolist()
                adv = float(sample - 1) + 0.25 * problem
                datums.append(Datum(tuple(prompt + action), (False,) * len(prompt) + (True,) * n,
                                    (0.0,) * len(prompt) + tuple(logps), adv))  # fmt: skip
        cfg = replace(
            TrainConfig(), learning_rate=1e-3, num_substeps=2, micro_batch_tokens=24, train_bf16=False,
            loss_fn="ppo", loss_agg="seq_mean", is_cap=2.0, kl_penalty_coef=0.1 if lora_rank else 0.0,
        )  # fmt: skip
        cfg = replace(cfg, parallel=mode)
        optimizer, scheduler = make_optimizer(scorer, cfg, 4)
        batch = collate(datums, 0, share_prefix=share_prefix(cfg, world))
        stats = _update(scorer, policy, None, optimizer, scheduler, batch, cfg, torch.device("cpu"), world)
        assert all(v == v for v in stats.values()), stats  # no NaN from an empty shard
    else:
        examples = []
        for n, n_loss in [(5, 1), (9, 6), (14, 3), (20, 12), (7, 7)]:
            tokens = torch.randint(3, 97, (n,), generator=g).tolist()
            examples.append(Example(tuple(tokens), tuple([False] * (n - n_loss) + [True] * n_loss)))
        cfg = replace(TrainConfig(), learning_rate=1e-3)
        optimizer, scheduler = make_optimizer(scorer, cfg, 4)
        for _ in range(2):
            stats = train_step(
                scorer, optimizer, examples, grad_accum_steps=2, pad_id=0, bf16=False, max_grad_norm=1.0, world=world
            )
            scheduler.step()
    with parallel.full_weights(scorer):
        weights = {k: v.detach().clone() for k, v in trained_weights(policy).items()}
    if world.main:
        torch.save({"weights": weights, "initial": initial, "stats": stats}, out)
    parallel.barrier(world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
