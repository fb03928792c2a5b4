"""CIFAR-10 benchmark: STR against GMP, Network Slimming, L1 filters and Torch-Pruning at equal MACs.

Two modes, one training loop (SGD, Nesterov, wd ``--wd``, bf16 autocast, channels_last, CUDA-graphed
forward/backward; data decoded once, kept and augmented on the GPU). Every pruning arm removes
structures to exactly ``--ratio``× fewer MACs (counted by sparsify for every arm; whether the pruned
net is within ``TARGET_TOLERANCE`` of the target is recorded as ``target_met``). One run = one arm at
one ratio; results are JSON files in ``--out``; ``--report`` writes the tables and the plots.

*From scratch*: one cosine schedule over ``--epochs`` (1-epoch warm-up, lr 0.1), pruning after
``--prune-epoch`` epochs, then training the pruned network for the remaining epochs.

*Protocol* (``--init``, the field's: DepGraph, Network Slimming, Li et al.): every arm starts from the
same converged dense state_dict (``--arm dense --save-model``) and trains ``--sparsify-epochs S`` then
``--finetune-epochs F`` with one cosine schedule over S+F (no warm-up, lr 0.01 unless ``--lr``; the
optimizer, momentum included, is made anew at pruning, the schedule goes on). Regularising and
gradual arms act during S and prune after it; ``l1_oneshot`` prunes before the first epoch;
``dense_ft`` is the dense model trained the same S+F epochs. On a GPU each run ends by timing its
network deployed (``sparsify.deploy.deploy``: batch 256, bf16, channels_last).

    python -m benchmarks.cifar --arm str_bn --ratio 2 --model resnet56 --epochs 40 --prune-epoch 30
    python -m benchmarks.cifar --arm dense --epochs 200 --batch 128 --save-model --out out/dense
    python -m benchmarks.cifar --init out/dense/resnet56_dense_1x_seed0.model.pt --sparsify-epochs 30 \
        --finetune-epochs 70 --parallel dense_ft str_bn:2.13 gmp_erk_bn:2.13 ... --max-procs 6 --out out/protocol
    python -m benchmarks.cifar --report --out out/protocol \
        --results-json benchmarks/results/cifar_resnet56_protocol.json
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
import sys
import time
from pathlib import Path

import torch

from benchmarks.cifar_lib.arms import ARMS, TARGET_TOLERANCE, macs_of, target_met
from benchmarks.cifar_lib.data import DeviceLoader, load_cifar10
from benchmarks.cifar_lib.launch import parallel
from benchmarks.cifar_lib.models import build
from benchmarks.cifar_lib.report import report
from benchmarks.cifar_lib.tp_arm import TP_IMPORTANCES
from benchmarks.cifar_lib.train import Recipe, Trainer
from benchmarks.cifar_lib.widths import conv_widths
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


def schedule(args: argparse.Namespace) -> Recipe:
    """The recipe of either mode (the protocol's: S+F epochs, pruning after S, lr 0.01, no warm-up)."""
    protocol = args.init is not None
    given = [v is not None for v in (args.init, args.sparsify_epochs, args.finetune_epochs)]
    if any(given) and not all(given):
        raise SystemExit("the protocol mode needs all of --init, --sparsify-epochs and --finetune-epochs "
                         "(from scratch: none of them, --epochs and --prune-epoch instead)")
    lr = args.lr if args.lr is not None else 0.01 if protocol else 0.1
    if protocol:
        return Recipe(epochs=args.sparsify_epochs + args.finetune_epochs, prune_epoch=args.sparsify_epochs,
                      batch=args.batch, lr=lr, weight_decay=args.wd, warmup_epochs=0.0)
    return Recipe(epochs=args.epochs, prune_epoch=args.prune_epoch, batch=args.batch, lr=lr, weight_decay=args.wd)


def load_init(model: torch.nn.Module, path: str, name: str) -> None:
    """The dense weights the protocol starts from (a state_dict written by ``--arm dense --save-model``)."""
    if not Path(path).exists():
        raise SystemExit(f"--init {path}: no such file; write one with --arm dense --save-model")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise SystemExit(f"--init {path} is not a dense state_dict of --model {name} (a pruned or other model?): "
                         f"{str(exc).splitlines()[0][:300]}; write one with --arm dense --model {name} "
                         "--save-model") from None


def make_arm(args: argparse.Namespace, recipe: Recipe, steps_per_epoch: int, train: DeviceLoader) -> object:
    arm = ARMS[args.arm](args.ratio, steps_per_epoch, recipe.prune_epoch, args.seed, args.ramp_end,
                         round_to=args.round_to)
    arm.batches = train
    if args.arm == "torch_pruning":
        arm.reg_every = arm.info["tp_reg_every"] = args.tp_reg_every
        arm.importance = args.tp_importance
    if args.arm == "slimming":  # the paper's λ: 1e-4 for VGG, 1e-5 for ResNets
        arm.l1 = args.slimming_l1 if args.slimming_l1 is not None else 1e-4 if args.model == "vgg19" else 1e-5
    return arm


def run(args: argparse.Namespace) -> dict:
    recipe = schedule(args)
    device, rank, world = _distributed(args)
    torch.manual_seed(args.seed)
    data = load_cifar10(args.data, args.limit, args.cache)
    train = DeviceLoader(data["train_x"], data["train_y"], recipe.batch, device, train=True, seed=args.seed,
                         rank=rank, world=world)
    test = DeviceLoader(data["test_x"], data["test_y"], 1000, device, train=False)
    model = build(args.model)
    if args.init is not None:
        load_init(model, args.init, args.model)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    example = next(iter(test))[0][:2]
    arm = make_arm(args, recipe, len(train), train)
    prune_epoch = 0 if arm.prune_at_start else recipe.prune_epoch
    macs_before, params_before = macs_of(model, example), sum(p.numel() for p in model.parameters())
    dense_widths = conv_widths(model)
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
        first, step, log, record = resume(ckpt, model, trainer, arm, train, args)
    elif args.init is not None:
        record["top1_init"] = trainer.evaluate(test)  # the dense model every arm starts from
    started = time.perf_counter()
    for epoch in range(first, recipe.epochs):
        if (args.stop_after_s is not None and epoch < (prune_epoch if arm.prunes else recipe.epochs) and epoch > first
                and time.perf_counter() - started > args.stop_after_s):
            save_checkpoint(ckpt, epoch, step, log, record, model, trainer, arm, train, args)
            return {}
        if epoch == prune_epoch and arm.prunes:
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
    macs_after = macs_of(model, example)
    record.update({
        "arm": arm.name, "label": label(args, arm.name), "ratio": args.ratio if arm.prunes else 1.0,
        "model": args.model, "seed": args.seed, "recipe": vars(recipe), "ramp_end": args.ramp_end,
        "init": args.init, "sparsify_epochs": args.sparsify_epochs, "finetune_epochs": args.finetune_epochs,
        "prune_epoch": prune_epoch if arm.prunes else None, "round_to": args.round_to,
        "macs_before": macs_before, "macs_after": macs_after, "macs_reduction": macs_before / macs_after,
        "target_met": target_met(macs_before / macs_after, args.ratio) if arm.prunes else None,
        "target_tolerance": TARGET_TOLERANCE,
        "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
        "top1": log[-1]["top1"], "train_seconds": sum(e["seconds"] for e in log),
        "images_per_s": statistics.median(e["images_per_s"] for e in log),
        **phase_speeds(log, prune_epoch if arm.prunes else recipe.prune_epoch), "epochs": log, "info": arm.info,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU",
        "torch": torch.__version__, "command": " ".join(sys.argv), "processes": world,
        "cuda_graphs": trainer.graphs, "graph_capture_error": trainer.capture_error,
        "dense_widths": dense_widths, "widths": conv_widths(model),
    })
    if device.type == "cuda" and not args.no_latency and not rank:
        from benchmarks.cifar_lib.latency import LATENCY_BATCH, deployed_latency_ms

        record["latency_ms"] = deployed_latency_ms(model, next(iter(test))[0])
        record["latency_batch"] = LATENCY_BATCH
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
    met = "" if record["target_met"] is None else " (target met)" if record["target_met"] else " (TARGET MISSED)"
    print(f"{record['label']} {record['ratio']:g}x: top1 {record['top1']:.4f}, MACs {record['macs_reduction']:.2f}x "
          f"fewer{met}, {record['train_seconds']:.0f} s, {record['images_per_s']:,.0f} images/s → {out / name}")
    return record


def phase_speeds(log: list[dict], prune_epoch: int) -> dict:
    """Median images/s of the epochs before pruning (the sparsify phase; the dense net for the dense arms)
    and after it (the pruned net; None where a phase had no epoch)."""
    before = [e["images_per_s"] for e in log if e["epoch"] <= prune_epoch]
    after = [e["images_per_s"] for e in log if e["epoch"] > prune_epoch]
    return {"images_per_s_sparsify": statistics.median(before) if before else None,
            "images_per_s_finetune": statistics.median(after) if after else None}


def label(args: argparse.Namespace, arm: str) -> str:
    """The arm's name with the variants that change what it does."""
    if not ARMS[arm].prunes:
        return arm
    parts = [arm]
    if arm == "torch_pruning" and args.tp_importance != "magnitude":
        parts.append(args.tp_importance)
    if arm == "torch_pruning" and args.tp_reg_every != 1:
        parts.append(f"reg every {args.tp_reg_every}")
    if args.round_to:
        parts.append(f"round_to {args.round_to}")
    if args.ramp_end != 0.6:
        parts.append(f"ramp {args.ramp_end:g}")
    return parts[0] + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


def run_name(args: argparse.Namespace, arm: str, world: int) -> str:
    prunes = ARMS[arm].prunes
    ratio = args.ratio if prunes else 1.0
    ramp = f"_ramp{args.ramp_end:g}" if args.ramp_end != 0.6 and prunes else ""
    ddp = f"_ddp{world}" if world > 1 else ""
    reg = f"_reg{args.tp_reg_every}" if arm == "torch_pruning" and args.tp_reg_every != 1 else ""
    imp = f"_{args.tp_importance}" if arm == "torch_pruning" and args.tp_importance != "magnitude" else ""
    rounded = f"_round{args.round_to}" if args.round_to and prunes else ""
    return f"{args.model}_{arm}_{ratio:g}x_seed{args.seed}{ramp}{reg}{imp}{rounded}{ddp}"


def save_checkpoint(path: Path, epoch: int, step: int, log: list, record: dict, model: torch.nn.Module,
                    trainer: Trainer, arm: object, train: DeviceLoader, args: argparse.Namespace) -> None:
    """Before the prune epoch only (the architecture is still the one ``build`` makes): the next run of
    the same command resumes from here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "step": step, "log": log, "record": record, "model": model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(), "arm": arm.state_dict(),
                "loader": train.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "args": {k: v for k, v in vars(args).items() if k != "stop_after_s"}}, path)
    print(f"checkpoint after {epoch} epochs → {path}; run the same command again to resume", flush=True)


def settings_differ(saved_args: dict, args: argparse.Namespace) -> list[str]:
    """The options whose values differ between a checkpoint's saved ``args`` and this run's, locations aside."""
    defaults = vars(parser().parse_args([]))  # options added since the checkpoint was written: their defaults
    where = {"stop_after_s", "data", "cache", "out"}  # locations, not settings: a run may resume elsewhere
    saved = {k: saved_args.get(k, defaults[k]) for k in defaults if k not in where}
    mine = {k: v for k, v in vars(args).items() if k not in where}
    return sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))


def resume(path: Path, model: torch.nn.Module, trainer: Trainer, arm: object, train: DeviceLoader,
           args: argparse.Namespace) -> tuple[int, int, list, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    diff = settings_differ(state["args"], args)
    if diff:
        raise SystemExit(f"{path} was written with other settings ({', '.join(diff)}); delete it or rerun the "
                         "command that wrote it")
    model.load_state_dict(state["model"])  # in place: a captured CUDA graph keeps its tensors
    trainer.optimizer.load_state_dict(state["optimizer"])
    arm.load_state_dict(state["arm"])
    train.generator.set_state(state["loader"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed after {state['epoch']} epochs from {path}", flush=True)
    return state["epoch"], state["step"], state["log"], state.get("record", {})


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
    p.add_argument("--tp-importance", choices=TP_IMPORTANCES, default="magnitude",
                   help="torch_pruning: its importance (group_sl: DepGraph's published recipe; taylor, lamp)")
    p.add_argument("--round-to", type=int, default=None,
                   help="pruned widths multiples of this (sparsify arms: SparsifierConfig.round_to)")
    p.add_argument("--slimming-l1", type=float, default=None,
                   help="slimming's λ (default: the paper's, 1e-4 for vgg19, 1e-5 for the ResNets)")
    p.add_argument("--init", default=None,
                   help="protocol mode: start every arm from this dense state_dict (written by --arm dense "
                        "--save-model); needs --sparsify-epochs and --finetune-epochs")
    p.add_argument("--sparsify-epochs", type=int, default=None,
                   help="protocol: S, the epochs that sparsify or regularise before pruning")
    p.add_argument("--finetune-epochs", type=int, default=None, help="protocol: F, the epochs after pruning")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 from scratch, 0.01 in the "
                   "protocol mode)")
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
    p.add_argument("--no-latency", action="store_true", help="skip timing the deployed network at the end (GPU)")
    p.add_argument("--parallel", nargs="+", metavar="ARM[:RATIO]", help="run these arms at once, one process each")
    p.add_argument("--max-procs", type=int, default=None, help="with --parallel: at most this many runs at once")
    p.add_argument("--report", action="store_true", help="print the table and plot from the JSON files in --out")
    p.add_argument("--results-json", default=None, help="with --report: also write the grouped rows (no per-epoch "
                   "logs) here, e.g. benchmarks/results/cifar_resnet56_protocol.json")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.report:
        report(Path(args.out), args.results_json)
    elif args.parallel:
        schedule(args)  # a wrong combination of the protocol's options fails here, not in every process
        Path(args.out).mkdir(parents=True, exist_ok=True)
        codes = parallel(args, args.parallel)
        if any(codes.values()):
            raise SystemExit(f"failed runs: {', '.join(s for s, c in codes.items() if c)} (see their .log in --out)")
    else:
        run(args)


if __name__ == "__main__":
    main()
