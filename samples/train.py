"""Train the shipped ``trained`` sample: a byte-level MoE LM on Python standard-library sources.

Token id = byte value (vocabulary 256). The corpus is the ``*.py`` files at the top of this Python's
standard library, in name order; every 10th file is held out. A slice of the held-out text and of the
training text are written beside the checkpoint (``heldout.txt``, ``calibration.txt``) so perplexity
and calibration later read the same bytes on every machine, whatever its Python version.

    python -m moeport.samples.train --minutes 20 --out samples/trained

The router gets a Switch-style load-balancing loss so that every expert is used: quantization work
measures routing on this model, and a model that sends every token to one expert would hide problems.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moeport.samples.checkpoint import save_checkpoint
from moeport.samples.model import LMConfig, MoEConfig, MoELM

TRAINED_CONFIG = LMConfig(
    vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
    moe=MoEConfig(num_experts=8, top_k=2, router="softmax_topk", norm_topk_prob=True, intermediate_size=128),
)
HELDOUT_EVERY = 10
HELDOUT_TEXT_BYTES = 64 * 1024
CALIBRATION_TEXT_BYTES = 32 * 1024


def stdlib_corpus() -> tuple[bytes, bytes, list[str]]:
    """(training bytes, held-out bytes, file names) from this Python's standard-library sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("test"))
    train, heldout = bytearray(), bytearray()
    for i, path in enumerate(files):
        data = path.read_bytes() + b"\n"
        (heldout if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).extend(data)
    return bytes(train), bytes(heldout), [p.name for p in files]


def load_balancing_loss(gate_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss: E * sum_e (fraction of slots to e) * (mean router prob of e)."""
    total = torch.zeros(())
    for logits in gate_logits:
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        fraction = F.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k
        total = total + num_experts * (fraction * probs.mean(0)).sum()
    return total / len(gate_logits)


def outside_topk_mass(gate_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Mean router probability left outside each token's top-k experts.

    Penalising it makes the router decisive about its top-k *set* (a clear gap between the k-th and
    (k+1)-th expert), while the balancing loss still spreads tokens over experts. A flat router flips
    its k-th expert under any small change of its input -- quantization noise included.
    """
    total = torch.zeros(())
    for logits in gate_logits:
        probs = torch.softmax(logits, dim=-1)
        total = total + (1 - torch.topk(probs, top_k, dim=-1).values.sum(-1)).mean()
    return total / len(gate_logits)


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: MoELM, data: torch.Tensor, seq: int = 256, max_windows: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) over non-overlapping windows of ``data``."""
    model.eval()
    losses = []
    for start in range(0, min(data.numel() - seq - 1, max_windows * seq), seq):
        chunk = data[start : start + seq + 1][None]
        logits, _ = model(chunk[:, :-1])
        losses.append(F.cross_entropy(logits[0], chunk[0, 1:]).item())
    model.train()
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance-coef", type=float, default=0.01, help="Switch load-balancing loss weight")
    parser.add_argument("--topk-mass-coef", type=float, default=0.0,
                        help="weight of the router probability left outside the top-k (0: off)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_bytes, heldout_bytes, names = stdlib_corpus()
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    heldout = torch.frombuffer(bytearray(heldout_bytes), dtype=torch.uint8).long()

    cfg = TRAINED_CONFIG
    model = MoELM(cfg)
    gate_logits: list[torch.Tensor] = []
    for moe in model.moe_layers():
        moe.router.gate.register_forward_hook(lambda _m, _i, out: gate_logits.append(out))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    step, started = 0, time.monotonic()
    model.train()
    for inputs, targets in batches(train, args.batch, args.seq, generator):
        # Cosine decay over the time budget rather than a step count: the budget is what we fix.
        progress = min(1.0, (time.monotonic() - started) / (deadline - started))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        gate_logits.clear()
        logits, _ = model(inputs)
        lm_loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        aux = load_balancing_loss(gate_logits, cfg.moe.num_experts, cfg.moe.top_k)
        loss = lm_loss + args.balance_coef * aux
        if args.topk_mass_coef:
            loss = loss + args.topk_mass_coef * outside_topk_mass(gate_logits, cfg.moe.top_k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {lm_loss.item():.3f} aux {aux.item():.3f}", flush=True)
        if time.monotonic() > deadline:
            break

    heldout_loss = evaluate(model, heldout)
    model.eval()
    out = save_checkpoint(model, cfg.to_dict(), args.out)
    (out / "heldout.txt").write_bytes(heldout_bytes[:HELDOUT_TEXT_BYTES])
    (out / "calibration.txt").write_bytes(train_bytes[:CALIBRATION_TEXT_BYTES])
    report = {
        "steps": step,
        "tokens_seen": step * args.batch * args.seq,
        "final_train_loss_nats": round(lm_loss.item(), 4),
        "heldout_loss_nats": round(heldout_loss, 4),
        "heldout_perplexity": round(math.exp(heldout_loss), 3),
        "corpus": f"{len(names)} top-level *.py files of the Python {sys.version.split()[0]} standard library; "
                  f"every {HELDOUT_EVERY}th file held out",
        "train_bytes": len(train_bytes),
        "heldout_bytes": len(heldout_bytes),
        "args": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
