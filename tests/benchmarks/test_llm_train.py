"""The LM corpus builder, tokenizer and training entry point on tiny fake wheels (no network)."""

from __future__ import annotations

import json
import lzma
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import llm_train
from benchmarks.llm_lib import corpus, tokens
from benchmarks.llm_lib.models import build_model, parameter_counts
from benchmarks.llm_lib.train import TrainConfig, lr_factor, train, train_batches

SOURCE = "def f{i}(x):\n    return x * {i}  # ünïcode\n\n\nclass C{i}:\n    value = 'v{i}'\n"


def fake_wheel(path: Path, package: str, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"{package}/mod{i}.py", SOURCE.format(i=i) * 3)
        archive.writestr(f"{package}/data.txt", "not python")
        archive.writestr(f"{package}/nul.py", "x = 1\x00")
        archive.writestr(f"{package}/latin.py", "x = '\xe9'".encode("latin-1"))
        archive.writestr(f"{package}/empty.py", "  \n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    wheels = [(fake_wheel(root / f"{p}.whl", p, 60), p) for p in ("alpha", "beta")]
    corpus.build_corpus(wheels, root / "corpus", vocab_size=320)
    return root / "corpus"


def test_documents_keep_only_utf8_python_without_nul(tmp_path):
    docs = list(corpus.documents_of_wheel(fake_wheel(tmp_path / "w.whl", "pkg", 3), "pkg"))
    assert [d.name for d in docs] == ["pkg/pkg/mod0.py", "pkg/pkg/mod1.py", "pkg/pkg/mod2.py"]
    assert docs[1].text == SOURCE.format(i=1) * 3


def test_split_is_by_file_hash_and_sorted():
    docs = [corpus.Document(f"p/m{i}.py", "x") for i in reversed(range(300))]
    splits = corpus.split_documents(docs)
    assert all(corpus.is_heldout(d.name) for d in splits["heldout"])
    assert not any(corpus.is_heldout(d.name) for d in splits["train"])
    assert 0 < len(splits["heldout"]) < 30 and len(splits["train"]) + len(splits["heldout"]) == 300
    assert [d.name for d in splits["train"]] == sorted(d.name for d in splits["train"])


def test_build_writes_splits_manifest_and_tokens(built):
    manifest = json.loads((built / "manifest.json").read_text())
    counts = manifest["splits"]
    assert counts["train"]["files"] + counts["heldout"]["files"] == 120
    texts = corpus.read_split(built / "train.txt.xz")
    assert len(texts) == counts["train"]["files"] and sum(map(len, texts)) == counts["train"]["chars"]
    assert counts["train"]["sha256"] == corpus.sha256_file(built / "train.txt.xz")
    arrays = tokens.load_tokens(built)
    assert arrays["train"].dtype == np.uint16 and (arrays["train"] == tokens.EOS_ID).sum() == len(texts)
    again = tokens.load_tokens(built)  # from the cache
    assert np.array_equal(again["heldout"], arrays["heldout"])


def test_tokenizer_round_trip_and_determinism(built):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    text = "def g(y):\n\treturn {'ü': y ** 2}  # \U0001f600\r\n"
    ids = tokenizer.encode(text).ids
    assert tokens.decode(tokenizer, ids) == text
    train_texts = corpus.read_split(built / "train.txt.xz")
    assert tokens.train_tokenizer(train_texts, vocab_size=320).to_str() == tokenizer.to_str()


def test_corpus_refuses_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"benchmarks\.llm_lib\.corpus"):
        tokens.load_tokens(tmp_path)


def test_train_batches_are_windows_of_the_stream():
    stream = torch.arange(1000, dtype=torch.int32)
    batch = next(train_batches(stream, 16, 4, seed=0))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 16, dtype=torch.int64))
    assert (batch[:, 0] % 16 == 0).all()


def test_lr_warms_up_then_decays_to_the_floor():
    config = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0.0, 0, config) == pytest.approx(0.1)
    assert lr_factor(0.0, 50, config) == pytest.approx(1.0)
    assert lr_factor(1.0, 500, config) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["llama", "moe"])
def test_one_training_step_changes_the_weights(kind):
    rng = np.random.default_rng(0)
    data = {"train": rng.integers(0, 64, 2000).astype(np.uint16), "heldout": rng.integers(0, 64, 300).astype(np.uint16)}
    before = build_model(kind, 64, tiny=True, seed=0).state_dict()
    config = TrainConfig(model=kind, minutes=None, tokens=4 * 32, seq_len=32, batch_size=4, eval_every=1,
                         eval_batches=1, tiny=True, device="cpu")
    model, record = train(config, data, 64, log=lambda _: None)
    assert record["steps"] == 1 and record["tokens_seen"] == 128
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one step of AdamW must move the weights"
    assert record["heldout_ppl"] == min(h["heldout_ppl"] for h in record["history"])


def test_full_size_configs_have_the_documented_sizes():
    with torch.device("meta"):
        llama, moe = build_model("llama"), build_model("moe")
    assert parameter_counts(llama)["total"] == 26_747_392
    assert parameter_counts(moe) == {"total": 28_353_024, "embedding": 4_194_304, "active": 14_197_248}
    assert llama.config.num_key_value_heads == 2 and moe.config.num_experts_per_tok == 2


def test_entry_point_trains_and_saves_a_loadable_checkpoint(built, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert llm_train.main(["--tiny", "--minutes", "0", "--tokens", str(3 * 4 * 32), "--seq-len", "32",
                           "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--corpus", str(built),
                           "--out", str(out), "--device", "cpu"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["config"]["model"] == "llama" and "sample" in record
    assert all(p.stat().st_size <= 15_000_000 for p in out.iterdir())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == tokens.EOS_ID
    assert "best held-out ppl" in capsys.readouterr().out
    assert lzma.decompress((built / "heldout.txt.xz").read_bytes())  # the corpus was left intact


def test_trained_models_are_prunable_by_sparsify():
    from sparsify import apply_plan, make_plan
    from sparsify.hf import experts

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    llama = build_model("llama", 64, tiny=True).float().eval()
    before = parameter_counts(llama)["total"]
    apply_plan(llama, {"input_ids": ids}, make_plan(llama, {"input_ids": ids}, 0.3))
    assert parameter_counts(llama)["total"] < before and llama(input_ids=ids).logits.shape == (2, 16, 64)
    moe = build_model("moe", 64, tiny=True).float().eval()
    experts.prune_experts(moe, experts.expert_importance(moe, [{"input_ids": ids}]), 0.5)
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert moe(input_ids=ids).logits.shape == (2, 16, 64)  # the saved config asks for no router loss
