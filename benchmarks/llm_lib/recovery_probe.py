"""Recovery settings compared on one pruned copy of the trained LM: learning rate and schedule.

    python -m benchmarks.llm_lib.recovery_probe --model-dir out/lm/llama --method taylor --target 0.25 \
        --steps 24 --batch 4 --settings constant:3e-4,cosine:3e-4,cosine:1e-3

Prunes once (``benchmarks.llm_lib.ours.width``, MLP widths at multiples of ``--round-to``), then for every
``schedule:lr`` distils a fresh copy of the pruned model from the dense one on the same batches
(``sparsify.lm.distill``, warm-up ``--warmup`` steps for ``cosine``) and prints the held-out perplexity;
``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.llm import load_model, windows
from benchmarks.llm_lib import ours
from benchmarks.llm_lib.budget import count_params
from benchmarks.llm_lib.tokens import load_tokens
from sparsify.lm.distill import distill
from sparsify.lm.evaluate import perplexity


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("out/lm/llama"))
    p.add_argument("--corpus", type=Path, default=Path("lmdata/corpus"))
    p.add_argument("--method", choices=sorted(ours.WIDTH), default="taylor")
    p.add_argument("--target", type=float, default=0.25, help="fraction of fewer parameters")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--settings", default="constant:3e-4,cosine:3e-4,cosine:1e-3", help="comma list of schedule:lr")
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    device = torch.device(args.device)
    tokens = load_tokens(args.corpus)
    dense = load_model(args.model_dir, device)
    for p in dense.parameters():
        p.requires_grad_(False)
    calib = windows(tokens["train"], min(256, args.seq_len), 8, 0).to(device)
    calibration = ours.Calibration(
        batches=[{"input_ids": b} for b in calib.split(4)], example={"input_ids": calib[:1, :min(64, args.seq_len)]},
        labeled=[{"input_ids": b, "labels": b} for b in calib.split(4)])
    heldout = torch.from_numpy(tokens["heldout"].astype(np.int64))[: args.eval_windows * args.seq_len]

    def ppl(model: torch.nn.Module) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return float(perplexity(model, heldout, seq_len=args.seq_len, batch_size=8)["ppl"])

    pruned = copy.deepcopy(dense)
    ours.width(pruned, calibration, round((1 - args.target) * count_params(dense)["total"]), args.method,
               round_to=args.round_to)
    rows = [{"setting": "dense", "ppl": ppl(dense)}, {"setting": "one-shot", "ppl": ppl(pruned)}]
    data = windows(tokens["train"], args.seq_len, args.steps * args.batch, 1).to(device)
    batches = [{"input_ids": b} for b in data.split(args.batch)]
    for setting in args.settings.split(","):
        schedule, lr = setting.split(":")
        student = copy.deepcopy(pruned)
        for p in student.parameters():
            p.requires_grad_(True)
        start = time.perf_counter()
        distill(student, dense, batches, steps=len(batches), lr=float(lr), schedule=schedule,  # type: ignore[arg-type]
                warmup_steps=args.warmup if schedule == "cosine" else 0, min_lr_ratio=0.1)
        rows.append({"setting": setting, "ppl": ppl(student), "seconds": round(time.perf_counter() - start, 1)})
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for row in rows:
        print(f"{row['setting']:>16}  ppl {row['ppl']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
