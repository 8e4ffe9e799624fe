"""Training: the loss goes down, output is byte-deterministic, the saved LoRA means what the training
forward computed (merging it reproduces the LoRA forward), kohya metadata, --full → extract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratool.adapters import load_adapter
from loratool.arch import kohya_modules
from loratool.cli import main
from loratool.detect import detect_checkpoint
from loratool.io.source import open_file
from loratool.metadata import kohya_hashes, parse_json_field
from loratool.train import LoRAModule, TrainOptions, inject_lora, train
from loratool.train.model import load_model
from loratool.train.sample import apply_lora

ASSETS = Path(__file__).resolve().parent.parent / "loratool" / "assets"
BASE = ASSETS / "tiny-sd1.safetensors"
DATA = ASSETS / "tiny_dataset"



def _opts(out: Path, **kw) -> TrainOptions:
    base = dict(base=BASE, data=DATA / "img", output=out, reg_data=DATA / "reg", rank=4, alpha=4.0,
                learning_rate=1e-3, steps=8, resolution=64, seed=0)
    base.update(kw)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "blob.safetensors"
    steps = []
    result = train(_opts(out), on_progress=lambda s, t, loss: steps.append((s, t, float(loss.split()[1]))))
    return result, steps


def test_loss_decreases(trained):
    result, steps = trained
    assert [s for s, _, _ in steps] == list(range(1, 9)) and all(t == 8 for _, t, _ in steps)
    assert result.eval_loss_after < result.eval_loss_before


def test_output_is_kohya_lora_with_metadata(trained):
    result, _ = trained
    src = open_file(result.output)
    adapter = load_adapter(src)
    assert (adapter.arch, adapter.naming, adapter.families) == ("sd1", "kohya", {"lora"})
    expected = {n for n, t in kohya_modules("sd1").items() if t.kind != "conv3x3"}
    assert set(adapter.modules) == expected
    md = src.metadata
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "4.0" and md["ss_network_module"] == "networks.lora"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False" and md["ss_steps"] == "8"
    assert md["ss_output_name"] == "blob" and md["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert parse_json_field(md, "ss_tag_frequency") == {
        "8_sks blob": {"sks blob": 4, "red circle": 1, "blue square": 1, "green circle": 1, "yellow square": 1}}
    assert parse_json_field(md, "ss_dataset_dirs") == {"8_sks blob": {"n_repeats": 8, "img_count": 4}}
    assert parse_json_field(md, "ss_reg_dataset_dirs") == {"1_blob": {"n_repeats": 1, "img_count": 2}}
    assert md["ss_num_train_images"] == "4" and md["ss_num_reg_images"] == "2"
    (dataset,) = parse_json_field(md, "ss_datasets")
    assert [(s["image_dir"], s["class_tokens"], s["num_repeats"], s["img_count"], s["is_reg"]) for s in dataset["subsets"]] == [
        ("8_sks blob", "sks blob", 8, 4, False), ("1_blob", "blob", 1, 2, True)]
    tensors = {k: src.get(k) for k in src.keys()}
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == kohya_hashes(tensors, md)


def test_training_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # fixes ss_training_started_at / finished_at
    name = {"output_name": "same", "steps": 3, "reg_data": None}
    a = train(_opts(tmp_path / "a.safetensors", **name)).output.read_bytes()
    b = train(_opts(tmp_path / "b.safetensors", **name)).output.read_bytes()
    c = train(_opts(tmp_path / "c.safetensors", **name, seed=1)).output.read_bytes()
    assert a == b

    def tensors(raw: bytes) -> bytes:
        n = int.from_bytes(raw[:8], "little")
        return raw[8 + n:]

    assert tensors(a) != tensors(c)


def _forward(model, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ids = torch.randint(0, 1000, (1, 77), generator=gen)
    with torch.no_grad():
        return model.unet(x, torch.tensor([400]), model.text_encoder(ids))


def test_merging_reproduces_lora_forward(trained):
    result, _ = trained
    adapter = load_adapter(open_file(result.output))
    base = _forward(load_model(BASE))

    wrapped = load_model(BASE)
    mods = inject_lora(wrapped, rank=4, alpha=4.0)
    with torch.no_grad():
        for name, m in adapter.modules.items():
            mods[name].lora_down.copy_(m.tensors["down"].float())
            mods[name].lora_up.copy_(m.tensors["up"].float())
            mods[name].alpha = float(m.tensors["alpha"])
    lora_out = _forward(wrapped)

    merged = load_model(BASE)
    assert apply_lora(merged, result.output, 1.0) == len(adapter.modules)
    merged_out = _forward(merged)

    assert (lora_out - base).abs().max() > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(merged_out, lora_out, atol=2e-5, rtol=1e-4)


def test_lora_module_delta_is_scaled_up_down():
    lin = torch.nn.Linear(6, 5)
    m = LoRAModule("x", lin, rank=2, alpha=1.0)
    torch.nn.init.normal_(m.lora_up)
    x = torch.randn(3, 6)
    expected = x @ (lin.weight + 0.5 * m.lora_up @ m.lora_down).T + lin.bias
    torch.testing.assert_close(m(x), expected)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    mc = LoRAModule("c", conv, rank=2, alpha=2.0)
    torch.nn.init.normal_(mc.lora_up)
    w = conv.weight + torch.einsum("or,rihw->oihw", mc.lora_up[:, :, 0, 0], mc.lora_down)
    xi = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(mc(xi), torch.nn.functional.conv2d(xi, w, conv.bias, padding=1))


def test_locon_cli_writes_conv_modules(tmp_path):
    out = tmp_path / "locon.safetensors"
    code = main(["train", "--base", str(BASE), "--data", str(DATA / "img"), "-o", str(out), "--rank", "2",
                 "--conv-rank", "2", "--conv-alpha", "1", "--steps", "1", "--resolution", "64", "--unet-only", "--json"])
    assert code == 0
    src = open_file(out)
    adapter = load_adapter(src)
    kinds = {m.target.kind for m in adapter.modules.values()}
    assert kinds == {"linear", "conv1x1", "conv3x3"}
    assert all(m.target.component == "unet" for m in adapter.modules.values())
    assert json.loads(src.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert main(["train", "--data", str(DATA / "img"), "-o", str(out), "--steps", "1"]) == 2  # exists, no --force


def test_full_finetune_is_an_sd1_checkpoint_and_extracts(tmp_path):
    tuned = tmp_path / "tuned.safetensors"
    code = main(["train", "--base", str(BASE), "--data", str(DATA / "img"), "-o", str(tuned), "--full", "--steps", "2",
                 "--lr", "1e-3", "--resolution", "64", "--save-dtype", "fp32", "--json"])
    assert code == 0
    src = open_file(tuned)
    specs = {k: src.spec(k) for k in src.keys()}
    assert detect_checkpoint(specs).arch == "sd1"
    base = open_file(BASE)
    unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(src.get(unet_key), base.get(unet_key).float())
    assert torch.equal(src.get(te_key), base.get(te_key))  # only the UNet is tuned
    try:
        from loratool.commands import extract  # noqa: F401
    except ImportError:
        pytest.skip("loratool extract is not available")
    lora = tmp_path / "extracted.safetensors"
    assert main(["extract", str(tuned), str(BASE), "--rank", "4", "-o", str(lora), "--device", "cpu", "--json"]) == 0
    adapter = load_adapter(open_file(lora))
    assert adapter.arch == "sd1" and adapter.modules
    assert all(m.target.component == "unet" for m in adapter.modules.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["train", "--data", str(DATA / "img"), "-o", str(out), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not out.exists()


def test_every_kohya_target_exists_at_real_sd15_size():
    from loratool.arch import checkpoint_layout
    from loratool.train.model import build_model, infer_config

    model = build_model(infer_config(checkpoint_layout("sd1", "ldm")), "meta", init=False)
    mods = inject_lora(model, rank=8, alpha=8, conv_rank=4)
    targets = kohya_modules("sd1")
    assert set(mods) == set(targets)
    for name, m in mods.items():
        assert tuple(m.base.weight.shape) == targets[name].shape, name
        assert tuple(m.delta().shape) == targets[name].shape, name
