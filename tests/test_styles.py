"""Studio styles (LoRAs): both layouts studios have (diffusers/PEFT and kohya) imported into
one form that diffusers reads as it reads the original file, checked against the exported
base model, published atomically beside it, listed and removed; and every file refused with
a message that says why (not a LoRA, another base model, truncated, a pickle)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.__main__ import main
from export.errors import ExportError
from export.styles import STYLES_DIR, VERSIONS_DIR, add_style, list_styles, remove_style
from export.tiny_lora import (
    TEXT_TARGETS,
    UNET_TARGETS,
    kohya_tensors,
    peft_tensors,
    random_lora,
    write_test_loras,
)


@pytest.fixture(scope="module")
def base_pipe(tiny_model: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )


@pytest.fixture(scope="module")
def lora_files(base_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_test_loras(base_pipe, tmp_path_factory.mktemp("loras"), seed=7)


@pytest.fixture
def repo(repository: Path) -> Iterator[Path]:
    """The session's exported repository, its styles removed after each test."""
    yield repository
    for style in list_styles(repository):
        remove_style(repository, style["name"])


def adapted_outputs(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's and the UNet's outputs on fixed inputs: what a style changes."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (1, 77), generator=generator)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        noise = pipe.unet(sample, torch.tensor([500.0]), context).sample
    return context, noise


def with_adapter(tiny_model: Path, file: Path, weight: float) -> tuple[torch.Tensor, ...]:
    """adapted_outputs of a fresh diffusers pipeline with `file` loaded at `weight`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="style")
    pipe.set_adapters(["style"], [weight])
    return adapted_outputs(pipe)


def test_both_layouts_import_to_one_style(repo: Path, lora_files: dict[str, Path]) -> None:
    peft = add_style(repo, "ember", lora_files["peft"])
    kohya = add_style(repo, "ember-kohya", lora_files["kohya"])
    assert peft["version"] == kohya["version"]  # the same matrices, the same content version
    assert (peft["source_format"], kohya["source_format"]) == ("peft", "kohya")
    assert peft["rank"] == kohya["rank"] == 4
    assert (peft["alphas"], kohya["alphas"]) == ([4.0], [2.0])
    assert peft["modules"] == kohya["modules"] == 74  # 44 in the UNet, 30 in the text encoder
    manifest = json.loads((repo / "stable_diffusion/1/weights/manifest.json").read_text())
    assert peft["base_model"] == {k: manifest["model"][k] for k in ("name", "version")}
    assert [s["name"] for s in list_styles(repo)] == ["ember", "ember-kohya"]


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_published_style_is_what_diffusers_reads_from_the_original(
    repo: Path, lora_files: dict[str, Path], tiny_model: Path, base_pipe: Any, layout: str
) -> None:
    add_style(repo, "ember", lora_files[layout])
    published = repo / "stable_diffusion" / STYLES_DIR / "ember" / "lora.safetensors"
    original = with_adapter(tiny_model, lora_files[layout], 0.7)
    converted = with_adapter(tiny_model, published, 0.7)
    plain = adapted_outputs(base_pipe)
    for got, want, base in zip(converted, original, plain, strict=True):
        assert (want - base).abs().max() > 1e-3  # the style changes both networks
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_alphas_in_diffusers_adapter_metadata_are_applied(
    repo: Path, base_pipe: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """A file save_lora_weights wrote for a LoraConfig with lora_alpha != r (and a pattern)."""
    from diffusers import StableDiffusionPipeline

    matrices = random_lora(base_pipe, rank=4, seed=3)
    tensors = peft_tensors(matrices)
    unet = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    text = {
        k.removeprefix("text_encoder."): v
        for k, v in tensors.items()
        if k.startswith("text_encoder.")
    }
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=unet,
        text_encoder_lora_layers=text,
        unet_lora_adapter_metadata={
            "r": 4,
            "lora_alpha": 8,
            "alpha_pattern": {"proj_in": 2},
            "target_modules": list(UNET_TARGETS),
        },
        text_encoder_lora_adapter_metadata={
            "r": 4,
            "lora_alpha": 1,
            "target_modules": list(TEXT_TARGETS),
        },
    )
    original = tmp_path / "pytorch_lora_weights.safetensors"
    style = add_style(repo, "metadata", original)
    assert style["alphas"] == [1.0, 2.0, 8.0]
    published = repo / "stable_diffusion" / STYLES_DIR / "metadata" / "lora.safetensors"
    for got, want in zip(
        with_adapter(tiny_model, published, 1.0),
        with_adapter(tiny_model, original, 1.0),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_adding_a_name_again_replaces_the_style_in_one_step(
    repo: Path, lora_files: dict[str, Path], base_pipe: Any, tmp_path: Path
) -> None:
    first = add_style(repo, "ember", lora_files["peft"])
    other = write_test_loras(base_pipe, tmp_path, seed=8)["kohya"]
    second = add_style(repo, "ember", other)
    assert first["version"] != second["version"]
    styles = repo / "stable_diffusion" / STYLES_DIR
    assert json.loads((styles / "ember" / "style.json").read_text()) == second
    kept = sorted(p.name for p in (styles / VERSIONS_DIR).iterdir())
    assert kept == [(styles / "ember").resolve().name]  # the replaced folder is gone
    remove_style(repo, "ember")
    assert list_styles(repo) == []
    with pytest.raises(ExportError, match="no style named 'ember'"):
        remove_style(repo, "ember")


def refused(repo: Path, file: Path, *, name: str = "bad") -> str:
    with pytest.raises(ExportError) as caught:
        add_style(repo, name, file)
    assert list_styles(repo) == []  # nothing published
    return str(caught.value)


def test_a_model_checkpoint_is_not_a_lora(repo: Path) -> None:
    unet = repo / "stable_diffusion/1/weights/diffusers/unet/diffusion_pytorch_model.safetensors"
    message = refused(repo, unet)
    assert "is not a LoRA" in message and "lora_A/lora_B" in message


def test_a_lora_for_another_base_model_is_refused_naming_the_module(
    repo: Path, base_pipe: Any, tmp_path: Path
) -> None:
    matrices = random_lora(base_pipe, rank=4, seed=1)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    a, b = matrices[key]
    matrices[key] = (torch.zeros(4, 768), b)  # SD 1.5's cross-attention width, not 32
    save_file(kohya_tensors(matrices), str(tmp_path / "sd15.safetensors"))
    message = refused(repo, tmp_path / "sd15.safetensors")
    assert "not trained for this base model" in message
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in message
    assert "[64, 32]" in message and "[4, 768]" in message

    extra = peft_tensors({"unet.down_blocks.3.attentions.0.proj_in": (a, b)})
    save_file(extra, str(tmp_path / "deeper.safetensors"))
    message = refused(repo, tmp_path / "deeper.safetensors")
    assert "down_blocks.3.attentions.0.proj_in does not exist here" in message


def test_a_truncated_file_is_refused(
    repo: Path, lora_files: dict[str, Path], tmp_path: Path
) -> None:
    whole = lora_files["kohya"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) - 1000])
    assert "is truncated" in refused(repo, cut)
    cut.write_bytes(whole[:100])  # inside the header
    assert "truncated or not a safetensors file" in refused(repo, cut)


@pytest.mark.parametrize("name", ["style.ckpt", "style.pt", "style.bin", "disguised.safetensors"])
def test_a_pickle_is_refused_unread(repo: Path, tmp_path: Path, name: str) -> None:
    file = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, file)  # zip container
    else:
        file.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [0.0]}))
    message = refused(repo, file)
    assert "is a pickle file" in message and "safetensors" in message


def test_a_bad_name_and_a_repository_without_a_model_are_refused(
    repo: Path, lora_files: dict[str, Path], tmp_path: Path
) -> None:
    assert "style name 'Ember Style'" in refused(repo, lora_files["peft"], name="Ember Style")
    with pytest.raises(ExportError, match="holds no exported model"):
        add_style(tmp_path, "ember", lora_files["peft"])


def test_the_command_line_adds_lists_and_removes(
    repo: Path, lora_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--repository", str(repo)]
    assert main(["style", "add", "--name", "ember", "--file", str(lora_files["kohya"]), *args]) == 0
    added = json.loads(capsys.readouterr().out)
    assert main(["style", "list", *args]) == 0
    assert json.loads(capsys.readouterr().out) == [added]
    tensors = load_file(repo / "stable_diffusion" / STYLES_DIR / "ember" / "lora.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert main(["style", "remove", "--name", "ember", *args]) == 0
    assert main(["style", "remove", "--name", "ember", *args]) == 2
    assert "no style named 'ember'" in capsys.readouterr().err


def test_a_file_that_is_not_safetensors_is_refused(repo: Path, tmp_path: Path) -> None:
    file = tmp_path / "notes.safetensors"
    file.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")  # a header that is no mapping
    assert "is not a safetensors file" in refused(repo, file)
    file.write_bytes(b"lora")
    assert "is not a safetensors file: 4 bytes, no header" in refused(repo, file)
