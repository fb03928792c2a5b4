"""A byte-level LLaMA on the Python language reference, sparsified with STR, pruned, saved and reloaded.

The model is a small Hugging Face LLaMA built from a config (no download). The data is the text of the
Python language reference that ships with CPython (``pydoc_data.topics``), read as bytes. The script:

1. trains the dense model for ``dense_steps``;
2. wraps it in ``Sparsifier(model, ids, adapter=..., policy="str")``: every MLP layer (``filter_norm``:
   one importance entry per intermediate neuron, the L2 norm of its gate/up rows) or every attention
   layer (``heads``: one entry per key/value group) gets a learned soft threshold, and training goes on
   for ``sparse_steps`` while weight decay shrinks the weights, a decay on the threshold parameters raises
   the thresholds, and the loss pushes back
   (``policy="gmp"`` prunes to a fixed fraction on a schedule instead: use it with ``heads``, whose
   weight norms are larger than any STR threshold sigmoid(s) < 1);
3. ``prune()``s: zeroed neurons/heads are removed physically (the pruned model computes exactly what
   the soft model did), with different widths in different layers;
4. fine-tunes the pruned model for ``finetune_steps``;
5. saves it with ``sparsify.hf.save_pretrained`` (config synced, per-layer widths recorded) and loads
   it back with ``sparsify.hf.from_pretrained``: same logits, same generated text.

It reports validation loss / perplexity (per byte), parameters, CPU latency and a generated sample at
each stage. Defaults take a few minutes on a laptop CPU.

Run: python examples/transformer_str.py [--adapter filter_norm] [--policy str] [--dense-steps 300] ...
     python examples/transformer_str.py --adapter heads --policy gmp   (KV groups, magnitude schedule)
"""

from __future__ import annotations

import argparse
import inspect
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from sparsify import GMPConfig, Sparsifier, STRConfig, hf


def corpus() -> torch.Tensor:
    """The Python language reference (shipped with CPython) as a tensor of byte values."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()


def build(hidden: int, layers: int, heads: int, kv_heads: int, seq: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq,
        use_cache=False, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(config)


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


def evaluate(model: torch.nn.Module, val: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (nats) over the validation windows."""
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=val, labels=val).loss)


def latency_ms(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median time of one forward pass over ``ids`` on one CPU thread (steadier than several)."""
    model.eval()
    times, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model(input_ids=ids)
            for _ in range(repeats):
                start = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * sorted(times)[len(times) // 2]


def sample(model: torch.nn.Module, prompt: str, tokens: int) -> str:
    ids = torch.tensor([list(prompt.encode())])
    model.eval()
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, use_cache=True)
    return bytes(out[0].tolist()).decode(errors="replace")


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, steps: int, batch: int, seq: int,
          generator: torch.Generator, sparsifier: Sparsifier | None = None, log_every: int = 100) -> None:
    model.train()
    for step in range(1, steps + 1):
        x = batches(data, batch, seq, generator)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sparsifier is not None:
            sparsifier.step()
        if step % log_every == 0:
            extra = f", {sparsifier.report().channel_sparsity:.1%} of structures zero" if sparsifier else ""
            print(f"  step {step}: train loss {float(loss.detach()):.3f}{extra}")
        model.train()


def make_policy(policy: str, sparse_steps: int, s_init: float, threshold_decay: float, sparsity: float,
                str_target: float | None) -> Any:
    """STR: learned thresholds (per layer); with ``str_target`` the budget controller brings the soft model
    to that fraction of MACs removed (exp thresholds: neuron norms are above 1). GMP: a cubic schedule to
    ``sparsity`` of each layer's structures (for heads, whose weight norms are larger than any STR
    threshold sigmoid(s) < 1 can reach)."""
    if policy == "str" and str_target:
        return STRConfig(s_init=s_init, threshold_fn="exp", target=str_target, target_unit="macs",
                         target_start_step=max(1, sparse_steps // 10), target_end_step=max(2, int(0.7 * sparse_steps)),
                         control_every=max(1, sparse_steps // 60))
    if policy == "str":
        return STRConfig(s_init=s_init, threshold_decay=threshold_decay)
    every = max(1, sparse_steps // 10)
    return GMPConfig(sparsity=sparsity, end_step=max(1, sparse_steps - 2 * every), update_every=every)


def main(adapter: str = "filter_norm", policy: str = "str", dense_steps: int = 300, sparse_steps: int = 300,
         finetune_steps: int = 100, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
         seq: int = 64, batch: int = 16, lr: float = 3e-3, s_init: float = -2.0, threshold_decay: float = 0.1,
         threshold_lr: float = 0.05, sparse_weight_decay: float = 0.3, gmp_sparsity: float = 0.5,
         str_target: float | None = 0.3,
         sample_tokens: int = 60, latency_repeats: int = 20, out_dir: str | None = None, seed: int = 0
         ) -> dict[str, Any]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = corpus()
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val = batches(val_data, 32, seq, torch.Generator().manual_seed(seed + 1))
    timing_ids = val[:8]
    model = build(hidden, layers, heads, kv_heads, seq)
    stats: dict[str, Any] = {}

    def record(stage: str) -> None:
        loss = evaluate(model, val)
        stats[stage] = {"val_loss": loss, "perplexity": math.exp(loss),
                        "params": sum(p.numel() for p in model.parameters()),
                        "latency_ms": latency_ms(model, timing_ids, latency_repeats)}
        print(f"{stage:>10}: val loss {loss:.3f} (ppl {math.exp(loss):6.2f}/byte)  params {stats[stage]['params']:,}  "
              f"latency {stats[stage]['latency_ms']:.2f} ms")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train(model, opt, train_data, dense_steps, batch, seq, generator)
    record("dense")
    stats["dense"]["sample"] = sample(model, "The ", sample_tokens)

    sp = Sparsifier(model, {"input_ids": val[:1]}, adapter=adapter,
                    policy=make_policy(policy, sparse_steps, s_init, threshold_decay, gmp_sparsity, str_target))
    # learned thresholds are model parameters: give them their own step size and no weight decay; a strong
    # decay on the weights lets neurons the loss does not need shrink below their layer's threshold
    thresholds = {id(p) for p in sp.parameters()}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in thresholds]},
                             {"params": sp.parameters(), "weight_decay": 0.0,
                              # Adam moves s by ~lr a step whatever the gradient: keep it small, or the
                              # thresholds drift far between two controller updates
                              "lr": threshold_lr if not (policy == "str" and str_target) else threshold_lr / 10}],
                            lr=lr, weight_decay=sparse_weight_decay)
    train(model, opt, train_data, sparse_steps, batch, seq, generator, sp)
    report = sp.report()
    Console().print(report.table())
    soft_loss = evaluate(model, val)
    result = sp.prune(optimizer=opt)
    stats["channel_sparsity"] = report.channel_sparsity
    record("pruned")
    stats["soft_val_loss"] = soft_loss
    stats["pruned"]["sample"] = sample(model, "The ", sample_tokens)
    stats["widths"] = hf.layer_widths(model)

    train(model, opt, train_data, finetune_steps, batch, seq, generator)
    record("finetuned")
    stats["finetuned"]["sample"] = sample(model, "The ", sample_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir or tmp) / "pruned-llama"
        hf.save_pretrained(model, path)
        loaded = hf.from_pretrained(path).eval()
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(input_ids=val).logits, loaded(input_ids=val).logits)
        stats["reload_identical"] = same and sample(loaded, "The ", sample_tokens) == stats["finetuned"]["sample"]
        stats["saved_config"] = {k: getattr(loaded.config, k) for k in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")}
        stats["layer_record"] = getattr(loaded.config, hf.RECORD, None)
    print(f"params {result.params_before:,} → {result.params_after:,}; per-layer widths:")
    for i, w in enumerate(stats["widths"]):
        print(f"  layer {i}: {w}")
    for stage in ("dense", "pruned", "finetuned"):
        print(f"{stage} sample: {stats[stage]['sample']!r}")
    print(f"saved + reloaded with sparsify.hf: identical logits and generation: {stats['reload_identical']}")
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, param in inspect.signature(main).parameters.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=param.default,
                            type=str if param.default is None else type(param.default))
    main(**vars(parser.parse_args()))
