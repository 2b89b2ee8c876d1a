"""The preflight: models, data and memory checked before a run, offline."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pruning_bridge import preflight as preflight_module
from pruning_bridge.preflight import PreflightError, count_parameters, preflight
from pruning_bridge.random_models import shape_config

ROOT = Path(__file__).resolve().parents[1]


def test_built_in_and_local_models_are_reachable_and_sized(tiny, tmp_path):
    model, tok = tiny("tiny-llama")
    model.save_pretrained(tmp_path / "saved")
    report = preflight(["tiny-llama", "shape:qwen3-0.6b", str(tmp_path / "saved")],
                       dtype="bfloat16")
    assert report.ok, report.render()
    lines = {c.what: c for c in report.checks}
    assert "596M parameters" in lines["model shape:qwen3-0.6b"].detail  # published 596,049,920
    assert "local folder" in lines[f"model {tmp_path / 'saved'}"].detail
    # bf16: 2 bytes per parameter, times the working factor
    assert "596M x 2 bytes x 2.5" in lines["memory for shape:qwen3-0.6b"].detail


def test_parameter_count_from_a_config_matches_the_built_model(tiny):
    model, _ = tiny("tiny-qwen3")
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())
    assert count_parameters(shape_config("tinyllama-1.1b")) == 1_100_048_384


def test_an_unreachable_hub_model_is_reported_with_the_way_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = preflight(["Qwen/Qwen3-0.6B", "nobody/no-such-model-xyz"], dtype="bfloat16")
    assert not report.ok
    missing = {c.what: c for c in report.missing}
    assert set(missing) == {"model Qwen/Qwen3-0.6B", "model nobody/no-such-model-xyz"}
    assert "hf download Qwen/Qwen3-0.6B --local-dir DIR" in missing["model Qwen/Qwen3-0.6B"].fix
    # the report's own models are still sized from the shipped config: memory can be judged
    qwen = next(c for c in report.checks if c.what == "memory for Qwen/Qwen3-0.6B")
    assert "596M" in qwen.detail
    assert not any(c.what == "memory for nobody/no-such-model-xyz" for c in report.checks)
    text = report.render()
    assert "[MISSING] model nobody/no-such-model-xyz" in text and "nothing was run" in text
    with pytest.raises(PreflightError, match="2 thing\\(s\\) missing"):
        report.raise_if_missing()


def test_too_little_memory_is_reported(monkeypatch):
    monkeypatch.setattr(preflight_module, "free_memory", lambda device: (2 ** 30, "free RAM"))
    report = preflight(["shape:tinyllama-1.1b", "tiny-gpt2"])  # float32: 4.4 GB of weights
    missing = [c.what for c in report.missing]
    assert missing == ["memory for shape:tinyllama-1.1b"]
    assert "--dtype bfloat16" in report.missing[0].fix


def test_data_loaders_are_tried(data_dir):
    from pruning_bridge.evals.data import load_gsm8k

    def broken():
        raise FileNotFoundError("no mmlu folder under /nowhere (expected mmlu/data/test)")

    report = preflight([], data={"GSM8K test": lambda: load_gsm8k("test", data_dir),
                                 "MMLU": broken})
    ok, bad = report.checks
    assert ok.ok and ok.detail == "1,319 items"
    assert not bad.ok and "no mmlu folder under /nowhere" in bad.detail
    assert "--data-dir" in bad.fix


def test_no_cuda_means_no_gpu_memory():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert preflight_module.free_memory("cuda") == (0, "no CUDA device visible")
    report = preflight(["tiny-gpt2"], device="cuda")
    assert [c.what for c in report.missing] == ["memory for tiny-gpt2"]


def test_the_report_preset_stops_before_any_work_when_offline(tmp_path, data_dir, monkeypatch,
                                                              capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("reproduce_report",
                                                  ROOT / "examples" / "reproduce_report.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    def no_loading(*_, **__):
        raise AssertionError("a model was loaded before the preflight passed")

    monkeypatch.setattr(job, "load_model", no_loading)
    out = tmp_path / "results"
    with pytest.raises(PreflightError) as caught:
        job.main(["--preset", "report", "--data-dir", str(data_dir), "--out", str(out),
                  "--figures", str(tmp_path / "figures"), "--dtype", "bfloat16"])
    message = str(caught.value)
    for model in ("Qwen/Qwen3-0.6B", "TinyLlama/TinyLlama_v1.1", "gpt2-large"):
        assert f"[MISSING] model {model}" in message
    for data in ("MMLU test", "GSM8K train + test", "ToxiGen", "RealToxicityPrompts",
                 "WikiText-2 test", "WikiText-2 validation (Wanda calibration)"):
        assert f"[ok] data {data}" in message
    assert message.count("[MISSING]") == 3  # only the hub models: every data set is there
    assert "baseline   Qwen/Qwen3-0.6B: MMLU 451" in message  # what would have run
    assert not out.exists()  # nothing was started


def test_unknown_spec_is_reported_without_asking_the_hub(monkeypatch):
    def no_hub(*_, **__):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_hub)
    report = preflight(["not-a-model"])
    assert [c.detail for c in report.missing] == ["unknown model spec"]


@pytest.mark.parametrize("damage", ["config is not JSON", "no weights", "truncated weights"])
def test_a_damaged_local_folder_is_missing_with_the_file_and_the_fix(damage, tiny, tmp_path):
    model, _ = tiny("tiny-gpt2")
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    if damage == "config is not JSON":
        (folder / "config.json").write_text("{not json")
    elif damage == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    report = preflight([str(folder)])  # a crash here was the bug
    (check,) = [c for c in report.checks if c.what == f"model {folder}"]
    assert not check.ok and not report.ok, report.render()
    says = {"config is not JSON": "config.json is not valid JSON", "no weights": "no weights",
            "truncated weights": "model.safetensors is truncated"}[damage]
    assert says in check.detail and "save_pretrained" in check.fix
