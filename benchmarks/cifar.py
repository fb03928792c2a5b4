"""CIFAR-10 benchmark: STR-BN against GMP-ERK, Network Slimming, L1 filters and Torch-Pruning at equal MACs.

Every arm uses the same recipe: one cosine schedule over ``--epochs`` (SGD, Nesterov, wd 5e-4,
batch 256, bf16 autocast, channels_last, CUDA-graphed forward/backward), pruning arms remove
structures after ``--prune-epoch`` epochs (to exactly ``--ratio``× fewer MACs, counted by
sparsify for every arm) and keep training the pruned network for the remaining epochs. Data is
decoded once and kept and augmented on the GPU. One run = one arm at one ratio; results are JSON
files in ``--out``; ``--report`` prints the table and draws accuracy against MACs.

    python -m benchmarks.cifar --arm str_bn --ratio 2 --model resnet56 --epochs 40 --prune-epoch 30
    python -m benchmarks.cifar --parallel dense str_bn:2 str_bn:4 gmp_erk:2 ...   # several runs at once
    python -m benchmarks.cifar --report --out out/cifar
    torchrun --nproc-per-node 2 -m benchmarks.cifar --arm str_bn --ratio 2   # DDP: same global batch

Under torchrun (DDP: NCCL on GPUs, gloo on CPUs) every rank takes its slice of the same global
batch, the Sparsifier is created on the plain model and the model is wrapped afterwards; before
pruning, `sparsify.distributed.check_synchronized` checks that thresholds and masks are identical
on every rank (recorded in the JSON); every rank prunes and the model is wrapped again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.cifar_lib.arms import ARMS, macs_of
from benchmarks.cifar_lib.data import DeviceLoader, load_cifar10
from benchmarks.cifar_lib.models import build
from benchmarks.cifar_lib.train import Recipe, Trainer
from sparsify import recalibrate_batchnorm

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "cifar10_jpeg.npz"


def _distributed(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """(device, rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if world == 1:
        return torch.device(args.device or ("cuda" if cuda else "cpu")), 0, 1
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.device(f"cuda:{local}" if cuda else "cpu"), torch.distributed.get_rank(), world


def run(args: argparse.Namespace) -> dict:
    device, rank, world = _distributed(args)
    torch.manual_seed(args.seed)
    data = load_cifar10(args.data, args.limit, args.cache)
    recipe = Recipe(epochs=args.epochs, prune_epoch=args.prune_epoch, batch=args.batch, lr=args.lr,
                    weight_decay=args.wd)
    train = DeviceLoader(data["train_x"], data["train_y"], recipe.batch, device, train=True, seed=args.seed,
                         rank=rank, world=world)
    test = DeviceLoader(data["test_x"], data["test_y"], 1000, device, train=False)
    model = build(args.model)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    example = next(iter(test))[0][:2]
    arm = ARMS[args.arm](args.ratio, len(train), recipe.prune_epoch, args.seed, args.ramp_end)
    if args.arm == "torch_pruning":
        arm.reg_every = arm.info["tp_reg_every"] = args.tp_reg_every
    macs_before, params_before = macs_of(model, example), sum(p.numel() for p in model.parameters())
    arm.setup(model, example)
    bf16 = device.type == "cuda" and not args.fp32
    trainer = Trainer(model, recipe, device, bf16=bf16, graphs=arm.graphs and not args.no_graphs, ddp=world > 1,
                      cache=arm.cache)
    trainer.rebuild(next(iter(train))[0])
    total_steps, step, log = recipe.epochs * len(train), 0, []
    record: dict = {}
    ckpt = Path(args.out) / (run_name(args, arm.name, world) + ".ckpt.pt")
    if world > 1 and args.stop_after_s is not None:
        raise SystemExit("--stop-after-s is for one process (checkpoints of DDP runs are not supported)")
    first = 0
    if ckpt.exists():
        first, step, log = resume(ckpt, model, trainer, arm, train, args)
    started = time.perf_counter()
    for epoch in range(first, recipe.epochs):
        if (args.stop_after_s is not None and epoch < recipe.prune_epoch and epoch > first
                and time.perf_counter() - started > args.stop_after_s):
            save_checkpoint(ckpt, epoch, step, log, model, trainer, arm, train, args)
            return {}
        if epoch == recipe.prune_epoch and arm.name != "dense":
            trainer.ungraph()
            if world > 1 and hasattr(arm, "sp"):
                from sparsify.distributed import check_synchronized

                record["synchronized"] = check_synchronized(arm.sp)  # raises if the ranks differ
            record["top1_before_prune"] = trainer.evaluate(test)
            model.eval()
            start = time.perf_counter()
            arm.prune(model, example)
            record["prune_seconds"] = time.perf_counter() - start
            record["top1_after_prune"] = trainer.evaluate(test)
            # every arm changed the activations under the BN layers (pruning, a last threshold shift):
            # with statistics re-estimated on 20 training batches the pruned network's own quality shows
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                recalibrate_batchnorm(model, (x for x, _ in train), max_batches=20)
            record["top1_after_prune_bn_recalibrated"] = trainer.evaluate(test)
            trainer.rebuild(next(iter(train))[0])
        step, stats = trainer.train_epoch(train, step, total_steps, arm)
        stats["epoch"] = epoch + 1
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == recipe.epochs:
            stats["top1"] = trainer.evaluate(test)
        log.append(stats)
        if rank:
            continue
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}), flush=True)
    trainer.ungraph()
    record.update({
        "arm": arm.name, "ratio": args.ratio if arm.name != "dense" else 1.0, "model": args.model, "seed": args.seed,
        "recipe": vars(recipe), "ramp_end": args.ramp_end, "macs_before": macs_before,
        "macs_after": macs_of(model, example),
        "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
        "top1": log[-1]["top1"], "train_seconds": sum(e["seconds"] for e in log),
        "images_per_s": statistics.median(e["images_per_s"] for e in log), "epochs": log, "info": arm.info,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__, "command": " ".join(sys.argv), "processes": world,
        "cuda_graphs": trainer.graphs, "graph_capture_error": trainer.capture_error,
    })
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank:
        return record
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = run_name(args, arm.name, world) + ".json"
    (out / name).write_text(json.dumps(record, indent=1, default=str))
    ckpt.unlink(missing_ok=True)
    if args.save_model:
        torch.save(model.state_dict(), out / (run_name(args, arm.name, world) + ".model.pt"))
    print(f"{arm.name} {record['ratio']:g}x: top1 {record['top1']:.4f}, MACs {macs_before / record['macs_after']:.2f}x "
          f"fewer, {record['train_seconds']:.0f} s, {record['images_per_s']:,.0f} images/s → {out / name}")
    return record


def run_name(args: argparse.Namespace, arm: str, world: int) -> str:
    ratio = args.ratio if arm != "dense" else 1.0
    ramp = f"_ramp{args.ramp_end:g}" if args.ramp_end != 0.6 and arm != "dense" else ""
    ddp = f"_ddp{world}" if world > 1 else ""
    reg = f"_reg{args.tp_reg_every}" if arm == "torch_pruning" and args.tp_reg_every != 1 else ""
    return f"{args.model}_{arm}_{ratio:g}x_seed{args.seed}{ramp}{reg}{ddp}"


def save_checkpoint(path: Path, epoch: int, step: int, log: list, model: torch.nn.Module, trainer: Trainer,
                    arm: object, train: DeviceLoader, args: argparse.Namespace) -> None:
    """Before the prune epoch only (the architecture is still the one ``build`` makes): the next run of
    the same command resumes from here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "step": step, "log": log, "model": model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(), "arm": arm.state_dict(),
                "loader": train.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "args": {k: v for k, v in vars(args).items() if k != "stop_after_s"}}, path)
    print(f"checkpoint after {epoch} epochs → {path}; run the same command again to resume", flush=True)


def resume(path: Path, model: torch.nn.Module, trainer: Trainer, arm: object, train: DeviceLoader,
           args: argparse.Namespace) -> tuple[int, int, list]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["args"]
    mine = {k: v for k, v in vars(args).items() if k != "stop_after_s"}
    if saved != mine:
        diff = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
        raise SystemExit(f"{path} was written with other settings ({', '.join(diff)}); delete it or rerun the "
                         "command that wrote it")
    model.load_state_dict(state["model"])  # in place: a captured CUDA graph keeps its tensors
    trainer.optimizer.load_state_dict(state["optimizer"])
    arm.load_state_dict(state["arm"])
    train.generator.set_state(state["loader"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed after {state['epoch']} epochs from {path}", flush=True)
    return state["epoch"], state["step"], state["log"]


def report(out: Path) -> None:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "summary.json"]
    records.sort(key=lambda r: (r["model"], r["ratio"], r["arm"]))
    table = Table(title=f"CIFAR-10 ({records[0]['device'] if records else '?'})")
    for col in ("model", "arm", "target", "MACs (M)", "MACs ×", "params (k)", "top-1 %", "before prune %",
                "right after %", "after, BN recal. %", "train s", "images/s"):
        table.add_column(col, justify="left" if col in ("model", "arm") else "right")
    for r in records:
        def pct(k: str, r: dict = r) -> str:
            return f"{100 * r[k]:.2f}" if k in r else "–"

        table.add_row(r["model"], r["arm"], f"{r['ratio']:g}×", f"{r['macs_after'] / 1e6:.1f}",
                      f"{r['macs_before'] / r['macs_after']:.2f}", f"{r['params_after'] / 1e3:.0f}", pct("top1"),
                      pct("top1_before_prune"), pct("top1_after_prune"),
                      pct("top1_after_prune_bn_recalibrated"), f"{r['train_seconds']:.0f}",
                      f"{r['images_per_s']:,.0f}")
    Console(width=200).print(table)
    (out / "summary.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "epochs"} for r in records],
                                                 indent=1, default=str))
    _plot(records, out / "accuracy_vs_macs.png")


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in sorted({r["arm"] for r in records}):
        rs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["macs_after"])
        ax.plot([r["macs_after"] / 1e6 for r in rs], [100 * r["top1"] for r in rs], "o-", label=arm)
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("CIFAR-10: accuracy against MACs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parallel(args: argparse.Namespace, specs: list[str]) -> None:
    """Launch one process per ``arm[:ratio]`` at once (the GPU is launch-bound with one), wait for all."""
    procs = []
    for spec in specs:
        arm, _, ratio = spec.partition(":")
        cmd = [sys.executable, "-m", "benchmarks.cifar", "--arm", arm, "--ratio", ratio or "2", *_passthrough(args)]
        log = open(Path(args.out) / f"{arm}_{ratio or 'dense'}.log", "w")
        procs.append((spec, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for spec, p, log in procs:
        p.wait()
        log.close()
        print(f"{spec}: exit {p.returncode}")


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--epochs", str(args.epochs), "--prune-epoch", str(args.prune_epoch),
           "--batch", str(args.batch), "--lr", str(args.lr), "--wd", str(args.wd),
           "--seed", str(args.seed), "--data", str(args.data),
           "--ramp-end", str(args.ramp_end), "--tp-reg-every", str(args.tp_reg_every),
           "--out", str(args.out), "--eval-every", str(args.eval_every)]
    for flag in ("cache", "limit", "device", "stop_after_s"):
        if getattr(args, flag) is not None:
            out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    flags = [f for f, on in (("--no-graphs", args.no_graphs), ("--fp32", args.fp32), ("--sync-bn", args.sync_bn),
                                  ("--save-model", args.save_model)) if on]
    return out + flags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=sorted(ARMS), default="dense")
    p.add_argument("--ratio", type=float, default=2.0, help="target: this many times fewer MACs")
    p.add_argument("--model", default="resnet56")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--prune-epoch", type=int, default=30)
    p.add_argument("--ramp-end", type=float, default=0.6,
                   help="gradual arms reach the target at this fraction of the epochs before pruning")
    p.add_argument("--stop-after-s", type=float, default=None,
                   help="before the prune epoch, stop after this many seconds at an epoch's end with a checkpoint "
                        "in --out; the same command resumes from it (for machines with a per-command time limit)")
    p.add_argument("--tp-reg-every", type=int, default=1,
                   help="torch_pruning: apply its group regularisation every N steps, N times as strong (its "
                        "regularize() is host-bound: ~0.3 s a step on the H100 machine)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--save-model", action="store_true", help="also write the final weights (<run>.model.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache", default=None, help="folder for the decoded arrays (skips decoding next time)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    p.add_argument("--device", default=None)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--no-graphs", action="store_true", help="eager forward/backward (no CUDA graph)")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--sync-bn", action="store_true", help="under DDP: SyncBatchNorm (BN statistics over all ranks)")
    p.add_argument("--out", default="out/cifar")
    p.add_argument("--parallel", nargs="+", metavar="ARM[:RATIO]", help="run these arms at once, one process each")
    p.add_argument("--report", action="store_true", help="print the table and plot from the JSON files in --out")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.report:
        report(Path(args.out))
    elif args.parallel:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        parallel(args, args.parallel)
    else:
        run(args)


if __name__ == "__main__":
    main()
