"""The LM pruning benchmark on a tiny LLaMA (and a tiny Mixtral) saved like llm_train's output, on CPU."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import llm
from benchmarks.llm_lib import corpus
from benchmarks.llm_lib.budget import (
    count_params,
    pretraining_tokens,
    recovery_steps,
    search_ratio,
    target_params,
    within,
)
from benchmarks.llm_lib.models import llama_config, moe_config
from benchmarks.llm_lib.ours import depth_counts

pytest.importorskip("transformers")

SOURCE = "def f{i}(x, y):\n    if x > y:\n        return x - {i}\n    return [y * {i} for _ in range(x)]\n\n"


def _wheel(path: Path, package: str, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"{package}/mod{i}.py", SOURCE.format(i=i) * 4)
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llm_corpus")
    wheels = [(_wheel(root / f"{p}.whl", p, 80), p) for p in ("alpha", "beta")]
    corpus.build_corpus(wheels, root / "corpus", vocab_size=320)
    return root / "corpus"


def _saved(tmp_path: Path, kind: str) -> Path:
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    config = (llama_config if kind == "llama" else moe_config)(320, max_positions=128, tiny=True)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    cls = LlamaForCausalLM if kind == "llama" else MixtralForCausalLM
    model = cls._from_config(config, attn_implementation="sdpa")
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


def _run(model_dir: Path, corpus_dir: Path, out: Path, methods: str, targets: str = "0.25",
         extra: tuple[str, ...] = ()) -> list[dict]:
    argv = [*extra, "--model-dir", str(model_dir), "--corpus", str(corpus_dir), "--out", str(out), "--methods", methods,
            "--targets", targets, "--recovery-steps", "2", "--recovery-batch", "2", "--seq-len", "32",
            "--calib-windows", "4", "--calib-batch", "2", "--eval-windows", "8", "--eval-batch", "4",
            "--throughput-batch", "2", "--device", "cpu", "--results-json", str(out / "results.json"),
            "--tp-timeout", "120"]
    assert llm.main(argv) == 0
    return json.loads((out / "results.json").read_text())["rows"]


def test_search_ratio_meets_a_decreasing_target() -> None:
    ratio = search_ratio(lambda r: 1000 * (1 - r) ** 2, 250.0)
    assert ratio == pytest.approx(0.5, abs=2e-3)
    assert within(1005, 1000) and not within(1020, 1000)
    assert target_params(1000, 0.25) == 750


def test_width_methods_and_depth_meet_the_target_and_write_every_phase(tmp_path, corpus_dir) -> None:
    model_dir = _saved(tmp_path, "llama")
    out = tmp_path / "out"
    rows = _run(model_dir, corpus_dir, out, "activation,magnitude,depth")
    names = sorted(p.name for p in out.glob("*.json"))
    for method in ("activation", "magnitude", "depth"):
        assert f"{method}_25_oneshot.json" in names and f"{method}_25_recovered.json" in names
    assert "dense_00_oneshot.json" in names
    by_method = {r["method"]: r for r in rows}
    dense = by_method["dense"]["params"]
    for method in ("activation", "magnitude"):
        row = by_method[method]
        assert row["target_met"] and abs(row["params"] - 0.75 * dense) <= 0.01 * 0.75 * dense
        assert math.isfinite(row["ppl_oneshot"]) and math.isfinite(row["ppl_recovered"])
        assert row["prune_s"] > 0 and row["tokens_per_s"] > 0
    kept = json.loads((out / "activation_25_oneshot.json").read_text())["kept"]
    assert kept and all(n % 8 == 0 for kind, n in kept if kind == "channel"), kept  # --round-to 8 by default
    depth = json.loads((out / "depth_25_oneshot.json").read_text())
    assert depth["removed_layers"] + depth["removed_attention"] + depth["removed_mlp"]
    assert depth["params"] < depth["dense_params"] and math.isfinite(depth["ppl"])
    recovered = json.loads((out / "activation_25_recovered.json").read_text())
    assert recovered["recovery_tokens"] == 2 * 2 * 32 and recovered["recovery_fraction_of_pretraining"] is None
    assert (out / "report.md").read_text().count("\n") == len(rows) + 2


def test_hidden_method_meets_the_target_by_residual_channels_alone(tmp_path, corpus_dir) -> None:
    rows = _run(_saved(tmp_path, "llama"), corpus_dir, tmp_path / "out", "hidden")
    by_method = {r["method"]: r for r in rows}
    row, dense = by_method["hidden"], by_method["dense"]["params"]
    assert "error" not in row, row.get("error")
    assert row["target_met"] and abs(row["params"] - 0.75 * dense) <= 0.01 * 0.75 * dense
    assert math.isfinite(row["ppl_oneshot"]) and math.isfinite(row["ppl_recovered"])
    record = json.loads((tmp_path / "out" / "hidden_25_oneshot.json").read_text())
    dense_hidden = json.loads((tmp_path / "llama" / "config.json").read_text())["hidden_size"]
    assert 0 < record["hidden_kept"] < dense_hidden


def test_a_method_that_fails_is_recorded_not_fatal(tmp_path, corpus_dir) -> None:
    rows = _run(_saved(tmp_path, "llama"), corpus_dir, tmp_path / "out", "experts")
    failed = [r for r in rows if r["method"] == "experts"]
    assert failed and "mixture-of-experts" in failed[0]["error"]


@pytest.mark.slow
def test_every_method_at_both_targets(tmp_path, corpus_dir) -> None:
    out = tmp_path / "llama_out"
    # --round-to 1: on this tiny model one step of 8 MLP neurons in every layer is ~5 % of the parameters, so
    # only unrounded widths can meet both targets within 1 % (the trained model's steps are ~0.5 %)
    rows = _run(_saved(tmp_path, "llama"), corpus_dir, out,
                "activation,magnitude,taylor,fluctuation,depth,tp_magnitude,tp_taylor", "0.25,0.5",
                extra=("--round-to", "1"))
    ok = {(r["method"], r["target"]) for r in rows if "error" not in r}
    for method in ("activation", "magnitude", "taylor", "fluctuation", "tp_magnitude", "tp_taylor"):
        for target in (0.25, 0.5):
            assert (method, target) in ok, [r for r in rows if r["method"] == method]
    for r in rows:
        if r["method"] in ("dense", "depth"):
            continue
        # Torch-Pruning's local ratio moves whole hidden channels (~1 % of this tiny model each)
        tolerance = 0.02 if r["method"].startswith("tp_") else 0.01
        assert abs(r["params"] - r["target_params"]) <= tolerance * r["target_params"], r
        assert math.isfinite(r["ppl_oneshot"]) and math.isfinite(r["ppl_recovered"])
    moe_rows = _run(_saved(tmp_path, "moe"), corpus_dir, tmp_path / "moe_out", "experts", "0.25")
    experts = next(r for r in moe_rows if r["method"] == "experts")
    assert "error" not in experts and math.isfinite(experts["ppl_recovered"])


def test_count_params_counts_a_tied_embedding_once() -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(320, tiny=True))
    counts = count_params(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == 320 * 64 and counts["non_embedding"] == counts["total"] - 320 * 64


def test_depth_counts_meet_both_targets_of_the_real_llama_with_sub_blocks() -> None:
    # the real llama: 8 layers, 655,872 params per attention (+ norm), 2,163,200 per MLP (+ norm), 26,747,392 in all
    attention, mlp, total = 655_872, 2_163_200, 26_747_392
    for fewer in (0.25, 0.5):
        target = target_params(total, fewer)
        b, a = depth_counts(8, attention, mlp, total - target, 0.01 * target)
        assert within(total - b * attention - a * mlp, target) and min(a, b) < 8
        assert not any(within(total - n * (attention + mlp), target) for n in range(8))  # whole layers alone miss
    assert depth_counts(4, 1, 3, 3, 0.1, cost=lambda b, a: a) == (3, 0)  # the least cost among the feasible
    assert depth_counts(2, 5, 5, 100, 0.5) in ((1, 2), (2, 1))  # nothing within: the closest, a layer kept


def test_recovery_budget_is_two_percent_of_the_pretraining_tokens(tmp_path) -> None:
    assert pretraining_tokens(tmp_path) is None and recovery_steps(None, 16, 512) == 100
    (tmp_path / "training.json").write_text(json.dumps({"tokens_seen": 100_000_000}))
    assert pretraining_tokens(tmp_path) == 100_000_000
    kept_at_step_40 = {"tokens_seen": 100_000_000, "best_step": 40, "config": {"batch_size": 64, "seq_len": 512}}
    (tmp_path / "training.json").write_text(json.dumps(kept_at_step_40))
    assert pretraining_tokens(tmp_path) == 40 * 64 * 512  # the kept (best) weights saw only these
    steps = recovery_steps(100_000_000, 16, 512)
    assert steps * 16 * 512 <= 0.02 * 100_000_000 < (steps + 1) * 16 * 512


def test_max_minutes_skips_and_says_what(tmp_path, corpus_dir) -> None:
    model_dir = _saved(tmp_path, "moe")
    (model_dir / "training.json").write_text(json.dumps({"tokens_seen": 10_000_000}))
    out = tmp_path / "out"
    argv = ["--model-dir", str(model_dir), "--corpus", str(corpus_dir), "--out", str(out), "--methods",
            "experts,magnitude", "--seq-len", "32", "--recovery-batch", "2", "--calib-windows", "2", "--eval-windows",
            "2", "--throughput-batch", "1", "--device", "cpu", "--results-json", str(out / "r.json"),
            "--max-minutes", "0"]
    assert llm.main(argv) == 0
    records = [json.loads(p.read_text()) for p in out.glob("*_oneshot.json")]
    skipped = {(r["method"], r["target_kind"]) for r in records if r["status"] == "skipped"}
    assert skipped == {("experts", "25% fewer parameters"), ("experts", "50% fewer parameters"),
                       ("experts", "half the experts"), ("magnitude", "25% fewer parameters"),
                       ("magnitude", "50% fewer parameters")}
    assert all("--max-minutes" in r["error"] for r in records if r["status"] == "skipped")
    meta = next(r["meta"] for r in records if r["method"] == "dense")
    assert meta["recovery_steps"] == int(0.02 * 10_000_000) // (2 * 32) and meta["recovery_tokens"] <= 200_000
    assert "half the experts" in (out / "report.md").read_text()


def test_recovery_probe_compares_settings_on_one_pruned_copy(tmp_path, corpus_dir) -> None:
    from benchmarks.llm_lib import recovery_probe

    out = tmp_path / "probe.json"
    rows = recovery_probe.main(["--model-dir", str(_saved(tmp_path, "llama")), "--corpus", str(corpus_dir),
                                "--method", "magnitude", "--steps", "3", "--batch", "2", "--seq-len", "32",
                                "--warmup", "1", "--eval-windows", "4", "--device", "cpu",
                                "--settings", "constant:1e-3,cosine:1e-3", "--out", str(out)])
    assert [r["setting"] for r in rows] == ["dense", "one-shot", "constant:1e-3", "cosine:1e-3"]
    assert all(math.isfinite(r["ppl"]) for r in rows) and rows[2]["ppl"] != rows[3]["ppl"]
    assert json.loads(out.read_text())["rows"] == rows
