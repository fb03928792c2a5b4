"""Prune the hidden units of a character-level LSTM language model with the ``rnn_units`` adapter.

The text is the Python language reference that ships with Python (``pydoc_data.topics``, about
470 KB of English), so the example runs offline. A 2-layer LSTM is trained dense, then with
gradual magnitude pruning (GMP) of its hidden units, pruned physically, and fine-tuned briefly.
Bits per character on held-out text, parameters and CPU latency are printed at each stage; the
pruned model computes exactly what the masked (soft) model did.

Run: python examples/lstm_language_model.py [--hidden 256 --sparsity 0.5 --steps 250]
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from sparsify import GMPConfig, Sparsifier
from sparsify.measure import progress


def load_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(ids))
        return self.head(out)


def batches(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator):
    """Random windows: inputs ids[i : i+L], targets ids[i+1 : i+L+1]."""
    while True:
        start = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + seq_len + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def bits_per_char(model: nn.Module, data: torch.Tensor, seq_len: int) -> float:
    """Cross-entropy on consecutive windows of ``data``, in bits per character."""
    usable = (len(data) - 1) // seq_len * seq_len
    x = data[:usable].view(-1, seq_len)
    y = data[1:usable + 1].view(-1, seq_len)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 64):
            logits = model(x[i:i + 64])
            total += nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 64].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel() / math.log(2)


def latency_ms(models: list[nn.Module], seq_len: int, repeats: int = 20) -> list[float]:
    """Per model, the fastest of ``repeats`` forward passes over a (1, seq_len) sequence, in ms.
    The models take turns, so a busy machine slows them alike."""
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    best = [math.inf] * len(models)
    with torch.no_grad():
        for i in range(repeats + 1):
            for k, model in enumerate(models):
                model.eval()
                t0 = time.perf_counter()
                model(ids)
                if i:  # the first round warms up
                    best[k] = min(best[k], time.perf_counter() - t0)
                model.train()
    return [1e3 * b for b in best]


def train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int, sparsifier: Sparsifier | None = None,
          what: str = "training") -> None:
    for _ in progress(range(steps), what):  # a bar on a terminal, silent in logs
        x, y = next(data)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sparsifier is not None:
            sparsifier.step()


def main(hidden: int = 256, layers: int = 2, embed: int = 64, steps: int = 250, finetune_steps: int = 100,
         sparsity: float = 0.5, seq_len: int = 64, batch: int = 32, eval_chars: int = 40_000,
         text_chars: int | None = None, seed: int = 0) -> dict[str, float]:
    """Dense training (``steps``), GMP on the hidden units (``steps``), prune, fine-tune; returns the numbers."""
    torch.manual_seed(seed)
    text = load_text()[:text_chars]
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    encoded = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(encoded))
    train_data, val_data = encoded[:split], encoded[split:split + eval_chars]
    data = batches(train_data, batch, seq_len, torch.Generator().manual_seed(seed))

    model = CharLSTM(len(vocab), embed, hidden, layers)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    train(model, opt, data, steps, what="dense training")
    results = {"vocab": len(vocab), "chars": len(text)}
    results["bpc_dense"] = bits_per_char(model, val_data, seq_len)
    results["params_dense"] = sum(p.numel() for p in model.parameters())
    dense = copy.deepcopy(model)  # for the latency comparison at the end

    example = next(data)[0]
    policy = GMPConfig(sparsity=sparsity, start_step=0, end_step=max(1, int(0.75 * steps)),
                       update_every=max(1, steps // 20))
    sp = Sparsifier(model, example, adapter="rnn_units", policy=policy)
    train(model, opt, data, steps, sp, what="GMP on hidden units")  # hidden units are masked gradually, the rest adapts
    results["bpc_soft"] = bits_per_char(model, val_data, seq_len)
    model.eval()
    with torch.no_grad():
        soft_logits = model(val_data[: seq_len * 8].view(8, seq_len))
    pruned = sp.prune(optimizer=opt)  # Adam's moments are sliced with the weights
    with torch.no_grad():
        results["max_abs_diff"] = (model(val_data[: seq_len * 8].view(8, seq_len)) - soft_logits).abs().max().item()
    model.train()
    results["hidden_pruned"] = model.lstm.hidden_size
    results["params_pruned"] = sum(p.numel() for p in model.parameters())
    results["bpc_pruned"] = bits_per_char(model, val_data, seq_len)
    results["latency_ms_dense"], results["latency_ms_pruned"] = latency_ms([dense, model], seq_len)

    model.lstm.flatten_parameters()
    train(model, opt, data, finetune_steps, what="fine-tuning")
    results["bpc_finetuned"] = bits_per_char(model, val_data, seq_len)
    results["seconds"] = time.perf_counter() - t0

    print(f"text: {len(text):,} characters, vocabulary {len(vocab)}; LSTM {layers}×{hidden}, "
          f"GMP on hidden units to {sparsity:.0%}")
    print(f"{'':>22} {'hidden':>7} {'params':>10} {'latency (ms)':>13} {'val bits/char':>14}")
    print(f"{'dense':>22} {hidden:>7} {results['params_dense']:>10,} {results['latency_ms_dense']:>13.2f} "
          f"{results['bpc_dense']:>14.3f}")
    print(f"{'masked (soft)':>22} {hidden:>7} {'':>10} {'':>13} {results['bpc_soft']:>14.3f}")
    print(f"{'pruned':>22} {results['hidden_pruned']:>7} {results['params_pruned']:>10,} "
          f"{results['latency_ms_pruned']:>13.2f} {results['bpc_pruned']:>14.3f}")
    print(f"{f'+ fine-tune {finetune_steps} steps':>22} {results['hidden_pruned']:>7} {results['params_pruned']:>10,} "
          f"{'':>13} {results['bpc_finetuned']:>14.3f}")
    print(f"pruned vs soft logits: max |difference| = {results['max_abs_diff']:.1e}; "
          f"{pruned.params_before / pruned.params_after:.2f}× fewer parameters; {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=250, help="dense steps, then as many with GMP")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of hidden units to remove")
    args = parser.parse_args()
    main(hidden=args.hidden, layers=args.layers, steps=args.steps, finetune_steps=args.finetune_steps,
         sparsity=args.sparsity)
