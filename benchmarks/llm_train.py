"""Train the LLaMA-style or the Mixtral-style decoder on the offline code corpus (issue #20).

    python -m benchmarks.llm_lib.corpus                      # once, here: builds lmdata/corpus (≈6 MiB)
    python -m benchmarks.llm_train --model llama --minutes 8 --out out/lm/llama
    python -m benchmarks.llm_train --model moe --minutes 8 --out out/lm/moe
    python -m benchmarks.llm_train --model llama --minutes 0 --tokens 200000000   # same data and schedule: tokens only

The corpus folder needs only ``train.txt.xz``, ``heldout.txt.xz`` and ``tokenizer.json``: the token
arrays are rebuilt (and cached beside it, ``lmdata/corpus-tokens.npz``) in seconds. The output folder holds the model in
bf16 safetensors shards of at most 15 MB (``save_pretrained(max_shard_size="15MB")``), the tokenizer
(loadable with ``AutoTokenizer``) and ``training.json`` (what was trained: config, tokens seen,
time, device, held-out perplexity over training, a greedy sample).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from benchmarks.llm_lib.models import MODELS
from benchmarks.llm_lib.tokens import EOS, load_tokens
from benchmarks.llm_lib.train import TrainConfig, train


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--model", choices=MODELS, default="llama")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the loop; 0: none")
    parser.add_argument("--tokens", type=int, default=None, help="token budget (alone: a deterministic run)")
    parser.add_argument("--corpus", type=Path, default=Path("lmdata/corpus"))
    parser.add_argument("--out", type=Path, default=Path("out/lm"))
    for name in ("seq_len", "batch_size", "warmup_steps", "eval_every", "eval_batches", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--tiny", action="store_true", help="test-size model (CPU smoke runs)")
    parser.add_argument("--device", default=defaults.device)
    return parser.parse_args(argv)


def save(model: torch.nn.Module, record: dict, corpus: Path, out: Path) -> list[Path]:
    """The model in bf16 shards ≤ 15 MB, the tokenizer and ``training.json``; returns the files written."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="15MB")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer.json"), eos_token=EOS,
                                        bos_token=EOS, pad_token=EOS)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return sorted(out.iterdir())


@torch.no_grad()
def sample(model: torch.nn.Module, corpus: Path, prompt: str = "def ", new_tokens: int = 48) -> str:
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    was_training = model.training
    model.eval()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    config = TrainConfig(model=args.model, minutes=args.minutes or None, tokens=args.tokens, seq_len=args.seq_len,
                         batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, eval_every=args.eval_every, eval_batches=args.eval_batches,
                         seed=args.seed, compile=args.compile, tiny=args.tiny, device=args.device)
    tokens = load_tokens(args.corpus)
    vocab_size = Tokenizer.from_file(str(args.corpus / "tokenizer.json")).get_vocab_size()
    print(f"corpus: {len(tokens['train']):,} train tokens, {len(tokens['heldout']):,} held-out tokens, "
          f"vocab {vocab_size}")
    model, record = train(config, tokens, vocab_size)
    record["sample"] = sample(model, args.corpus)
    print(f"best held-out ppl {record['heldout_ppl']:.2f} (step {record['best_step']}), "
          f"{record['tokens_seen'] / 1e6:.1f}M tokens in {record['seconds']:.0f}s, "
          f"{record['train_tokens_per_s'] / 1e3:.1f}k tok/s, {record['epochs']} epochs")
    print("sample:", repr(record["sample"]))
    for path in save(model, record, args.corpus, args.out):
        print(f"  {path}  {path.stat().st_size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
