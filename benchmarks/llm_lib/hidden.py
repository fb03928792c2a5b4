"""The ``hidden`` method of the LM benchmark: residual-stream channels removed with calibrated compensation.

``hidden(model, calibration, target)`` prunes hidden channels only (``sparsify.hf.hidden.prune_hidden``,
least-squares compensation) to a parameter target. Run alone, this file measures what the hidden size costs:
held-out perplexity at given fractions of fewer hidden channels, for every compensation mode:

    python -m benchmarks.llm_lib.hidden --model-dir out/lm/llama --fractions 0.1,0.25 --out out/hidden
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.llm_lib.budget import count_params

MODES = ("none", "scale", "diag", "lstsq")


def params_per_channel(model: nn.Module) -> int:
    """Parameters one hidden channel costs (embedding once if tied, every projection in/out, the norms)."""
    from sparsify.hf.hidden import stream_sites

    sites = stream_sites(model)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    per = model.get_input_embeddings().weight.shape[0] + (0 if tied else model.lm_head.out_features)
    per += sum(1 + sum(model.get_submodule(c).out_features for c in s.consumers if c != "lm_head") for s in sites)
    per += sum(layer.self_attn.o_proj.in_features + layer.mlp.down_proj.in_features for layer in model.model.layers)
    return per


def hidden(model: nn.Module, calibration: Any, target: int, compensate: str = "lstsq") -> dict[str, Any]:
    """Remove hidden channels of ``model`` (in place) to about ``target`` parameters."""
    from sparsify.hf.hidden import prune_hidden

    start = time.perf_counter()
    total, d = count_params(model)["total"], model.config.hidden_size
    keep = d - round((total - target) / params_per_channel(model))
    model.config.use_cache = False
    result = prune_hidden(model, calibration.batches, keep=keep, compensate=compensate)
    return {"prune_s": time.perf_counter() - start, "kinds": ["hidden"], "hidden_kept": len(result.kept),
            "note": f"sparsify hidden size {d} -> {len(result.kept)} ({compensate} compensation, "
                    "consumer-energy importance)"}


def _perplexity(model: nn.Module, heldout: torch.Tensor, seq_len: int) -> float:
    from sparsify.lm.evaluate import perplexity

    return float(perplexity(model, heldout, seq_len=seq_len, batch_size=8)["ppl"])


def main(argv: list[str] | None = None) -> int:
    import copy

    from benchmarks.llm import load_model, windows
    from benchmarks.llm_lib.tokens import load_tokens
    from sparsify.hf.hidden import prune_hidden

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("out/lm/llama"))
    p.add_argument("--corpus", type=Path, default=Path("lmdata/corpus"))
    p.add_argument("--out", type=Path, default=Path("out/hidden"))
    p.add_argument("--fractions", default="0.1,0.25")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--scores", default="consumer", help="comma list of importance scores: consumer, energy")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    tokens = load_tokens(args.corpus)
    device = torch.device(args.device)
    dense = load_model(args.model_dir, device)
    calib = windows(tokens["train"], args.seq_len, args.calib_windows, 0).to(device)
    batches = [{"input_ids": b} for b in calib.split(4)]
    heldout = torch.from_numpy(tokens["heldout"][: args.eval_windows * args.seq_len].astype(np.int64))
    rows = [{"fraction": 0.0, "mode": "dense", "score": "-", "hidden": dense.config.hidden_size,
             "ppl": _perplexity(dense, heldout, args.seq_len)}]
    print(rows[0])
    for score in args.scores.split(","):
        for fraction in (float(f) for f in args.fractions.split(",")):
            for mode in args.modes.split(","):
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                r = prune_hidden(model, batches, fraction, compensate=mode, score=score)
                scales = list(r.scales.values())
                rows.append({"fraction": fraction, "mode": mode, "score": score, "hidden": len(r.kept),
                             "ppl": _perplexity(model, heldout, args.seq_len), "prune_s": time.perf_counter() - start,
                             "mean_scale": float(np.mean(scales)) if scales else None, "sqrt_d_ratio": r.sqrt_ratio})
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model_dir": str(args.model_dir), "seq_len": args.seq_len, "calib_windows": args.calib_windows,
            "eval_windows": args.eval_windows, "device": str(device), "torch": torch.__version__}
    (args.out / "hidden.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
