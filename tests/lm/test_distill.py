"""Recovery by distillation: a pruned tiny LLaMA moves towards its dense teacher; the teacher is untouched."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from sparsify import GMPConfig, Sparsifier, SparsifyError
from sparsify.lm.distill import _kl, distill, with_lora
from sparsify.oneshot import apply_plan, make_plan

transformers = pytest.importorskip("transformers")


def _teacher() -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, use_cache=False, initializer_range=0.1)
    torch.manual_seed(0)  # a wider init than the default: peaked logits, so the pruned student's KL is large
    return transformers.LlamaForCausalLM(config).eval()


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 128, (4, 16), generator=g)), "labels": ids} for _ in range(n)]


def _mean_kl(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        return sum(float(_kl(student(input_ids=b["input_ids"]).logits, teacher(input_ids=b["input_ids"]).logits,
                             1.0, None)) for b in batches) / len(batches)


def test_distilling_a_pruned_llama_lowers_the_kl_and_leaves_the_teacher_alone() -> None:
    teacher = _teacher()
    batches = _batches()
    student = copy.deepcopy(teacher)
    x = {"input_ids": batches[0]["input_ids"][:2]}
    apply_plan(student, x, make_plan(student, x, 0.5, unit="channels", kinds={"channel"}), importance="filter_norm")
    before_state = copy.deepcopy(teacher.state_dict())
    before = _mean_kl(student, teacher, batches)
    log = distill(student, teacher, batches, steps=16, lr=1e-3, temperature=1.0, alpha=0.9, hidden_weight=0.1)
    after = _mean_kl(student, teacher, batches)
    assert after < 0.7 * before, (before, after)
    assert len(log) == 16 and all(e["lm"] > 0 and e["hidden"] > 0 for e in log)  # all three terms were used
    assert all(torch.equal(before_state[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert not student.training  # its mode is restored too
    with pytest.raises(SparsifyError, match="labels"):
        distill(student, teacher, [{"input_ids": batches[0]["input_ids"]}], steps=1, alpha=0.5)
    with pytest.raises(SparsifyError, match="no batch"):
        distill(student, teacher, iter([]), steps=1)


def test_distillation_between_prune_steps_keeps_the_optimizer_state() -> None:
    teacher = _teacher()
    batches = _batches(2)
    student = copy.deepcopy(teacher)
    x = {"input_ids": batches[0]["input_ids"][:2]}
    sp = Sparsifier(student, x, adapter="filter_norm", policy=GMPConfig(sparsity=0.5, start_step=0, end_step=4,
                                                                          update_every=1))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    distill(student, teacher, batches, steps=4, optimizer=opt, on_step=lambda i: sp.step())
    steps = int(opt.state[student.model.layers[0].mlp.down_proj.weight]["step"])
    assert steps == 4
    sp.prune(optimizer=opt)
    down = student.model.layers[0].mlp.down_proj.weight  # the pruned parameter
    assert down.shape == (64, 64) and opt.state[down]["exp_avg"].shape == down.shape  # sliced with the weight
    assert int(opt.state[down]["step"]) == steps  # the state moved with it, not reset
    log = distill(student, teacher, batches, steps=2, optimizer=opt)
    assert int(opt.state[down]["step"]) == steps + 2 and len(log) == 2


def test_lora_needs_peft_or_wraps_the_student() -> None:
    teacher = _teacher()
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(SparsifyError, match="pip install peft"):
            with_lora(copy.deepcopy(teacher))
        return
    student = with_lora(copy.deepcopy(teacher), r=4)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    distill(student, teacher, _batches(1), steps=1)


def test_cosine_schedule_warms_up_decays_and_restores_the_optimizer_lr() -> None:
    from sparsify.lm.distill import lr_factor

    factors = [lr_factor(i, 10, 2, 0.1) for i in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))  # non-increasing after the warm-up
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    seen: list[float] = []
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    distill(student, teacher, _batches(2), steps=4, optimizer=opt, schedule="cosine", warmup_steps=1,
            on_step=lambda i: seen.append(opt.param_groups[0]["lr"]))
    assert seen == pytest.approx([1e-3 * lr_factor(i, 4, 1, 0.0) for i in range(4)]) and seen[-1] == 0.0
    assert opt.param_groups[0]["lr"] == 1e-3  # put back
    with pytest.raises(SparsifyError, match="warmup_steps"):
        distill(student, teacher, _batches(2), steps=2, schedule="cosine", warmup_steps=2)
