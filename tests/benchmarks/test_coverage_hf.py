"""The Hugging Face part of the coverage zoo: sub-configs are parts of a family (not counted), records of
another run merge into the JSON without touching other families, and inputs are made for encoder-decoder,
audio, vision and vision-language models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import coverage, coverage_inputs, coverage_models, coverage_report

pytest.importorskip("transformers")


def test_a_sub_config_names_its_family_and_a_real_family_is_not_hidden() -> None:
    assert coverage_models.hf_sub_config_of("clap_text_model") == "clap"
    assert coverage_models.hf_sub_config_of("clap") is None
    assert coverage_models.hf_sub_config_of("upernet") is None  # no AutoModel class, but a segmentation head
    assert coverage_models.hf_sub_config_of("siglip_vision_model") is None  # AutoModel knows it: a family


def test_sub_configs_are_left_out_of_the_totals_and_shown_as_such(tmp_path: Path) -> None:
    models = {"a": {"family": "a", "result": "exact", "model": "A", "exact": 1, "groups": 2, "rel_error": 0.0},
              "a_text_model": {"family": "a_text_model", "result": "not built", "reason": "x", "sub_config_of": "a"},
              "a_vision": coverage.sub_config_record("a_vision", "a")}
    totals = coverage.totals(models)
    assert totals["families"] == 1 and totals["built"] == 1 and totals["sub_configs"] == 2
    assert totals["results"] == {"exact": 1} and totals["exact_share_of_built"] == 1.0
    machine = dict.fromkeys(("platform", "cpus", "torch", "timm", "transformers", "torchvision", "torch-pruning"), "?")
    (tmp_path / "coverage_hf.json").write_text(json.dumps(
        {"command": "c", "date": "d", "machine": machine, "totals": totals, "models": models}))
    page = coverage_report.render(tmp_path)
    assert "1 families (and 2 sub-configs, not counted), 1 build" in page
    assert "| sub-config of a (not counted) |" in page
    assert "sub-config of a (not counted); run as a model: **not built**: x" in page


def test_merge_updates_only_the_named_families(tmp_path: Path) -> None:
    out, other = tmp_path / "out.json", tmp_path / "other.json"
    rec = {"family": "", "result": "exact"}
    out.write_text(json.dumps({"command": "first", "models": {"a": {**rec, "family": "a"},
                                                              "b": {**rec, "family": "b", "result": "timeout"}}}))
    other.write_text(json.dumps({"command": "second", "models": {"b": {**rec, "family": "b"},
                                                                 "c": {**rec, "family": "c", "result": "FAIL"}}}))
    assert coverage.main(["--suite", "timm", "--merge", str(other), "--families", "b", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"a", "b"} and data["models"]["b"]["result"] == "exact"
    assert data["command"] == "first; second" and data["totals"]["results"] == {"exact": 2}


def test_a_re_run_without_torch_pruning_keeps_its_result_for_the_same_model_only(tmp_path: Path) -> None:
    out, other = tmp_path / "out.json", tmp_path / "other.json"
    tp = {"builds": True, "prunes": True, "runs": False}
    old = {"result": "FAIL", "model": "A", "params": 10, "torch_pruning": tp}
    out.write_text(json.dumps({"command": "first", "models": {"a": {**old, "family": "a"},
                                                              "b": {**old, "family": "b"}}}))
    rerun = {"result": "exact", "model": "A", "params": 10}
    other.write_text(json.dumps({"command": "second", "models": {"a": {**rerun, "family": "a"},
                                                                 "b": {**rerun, "family": "b", "params": 7}}}))
    assert coverage.main(["--suite", "timm", "--merge", str(other), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["models"]["a"]["result"] == "exact" and data["models"]["a"]["torch_pruning"] == tp
    assert "torch_pruning" not in data["models"]["b"]  # another tiny model: the old result is not its own
    assert data["totals"]["torch_pruning"] == {"builds": 1, "prunes": 1, "runs": 0}


def _config(**fields: object) -> object:
    from transformers import PretrainedConfig

    return PretrainedConfig(**fields)


def test_text_ids_avoid_placeholder_tokens_but_not_ordinary_ones() -> None:
    ids = coverage_inputs.text_ids(_config(vocab_size=8, image_token_id=5, pad_token_id=4), length=64)
    assert ids.min() >= 3 and ids.max() < 8 and not (ids == 5).any() and (ids == 4).any()
    aria = _config(vocab_size=8, image_token_index=6, projector_patch_to_query_dict={1225: 128, 4900: 256})
    ids = coverage_inputs.text_ids(aria, length=64)  # a dict with int keys in the config: Aria's did not build
    assert not (ids == 6).any() and ids.max() < 8


def test_placeholders_are_added_as_many_as_the_error_asks_for() -> None:
    config = _config(vocab_size=32, image_token_id=7)
    inputs = {"input_ids": coverage_inputs.text_ids(config), "pixel_values": torch.zeros(1, 3, 4, 4)}
    error = ValueError("Image features and image tokens do not match, tokens: 0, features: 5")
    fixed = coverage_inputs.with_placeholders(inputs, config, error)
    assert fixed is not None and fixed["input_ids"].shape == (2, 13) and fixed["pixel_values"] is inputs["pixel_values"]
    assert int((fixed["input_ids"][0] == 7).sum()) == 5 and not (fixed["input_ids"][1] == 7).any()
    assert coverage_inputs.with_placeholders(inputs, config, ValueError("something else")) is None
    config.hidden_size = 4  # LLaVA prints features × width: 5 tokens there, 20 "features", read as 20 / 4
    wide = ValueError("Image features and image tokens do not match, tokens: 20, features: 20")
    assert int((coverage_inputs.with_placeholders(inputs, config, wide)["input_ids"] == 7).sum()) == 5


class _Features(nn.Module):
    main_input_name = "input_features"

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return input_features


def test_audio_features_come_in_both_layouts_with_decoder_ids_for_an_encoder_decoder() -> None:
    config = _config(encoder_config={"num_mel_bins": 8}, max_source_positions=5, is_encoder_decoder=True)
    shapes = [(tuple(c["input_features"].shape), tuple(c.get("decoder_input_ids", torch.empty(0)).shape))
              for c in coverage_inputs.input_candidates(_Features(), config)]
    assert shapes[:2] == [((1, 8, 10), (2, 8)), ((1, 10, 8), (2, 8))]


class _Layout(nn.Module):
    def forward(self, input_ids: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        return bbox


def test_layout_models_get_boxes_with_ordered_corners() -> None:
    inputs = next(coverage_inputs.input_candidates(_Layout(), _config(vocab_size=64)))
    box = inputs["bbox"]
    assert box.shape == (2, 8, 4) and (box[..., 2:] >= box[..., :2]).all() and box.max() <= 1000


@pytest.mark.parametrize("family,main", [("llava", "pixel_values"), ("speech_to_text", "input_features")])
def test_vision_language_and_speech_models_build_with_the_inputs_they_need(family: str, main: str) -> None:
    name, (model, inputs, _) = coverage_models.build_hf(family)
    assert main in inputs, (name, list(inputs))
    if family == "llava":  # as many image tokens as the vision tower gives features
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) >= 1
