"""The --pretrained (Stable Diffusion) path on a tiny randomly initialised pipeline built from configs."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from munba_kernels.drivers import diffusion  # noqa: E402
from munba_kernels.drivers.stable_diffusion import load_pipeline, trainable_unet_parameters  # noqa: E402

WORDS = ["a", "photo", "of", "cat", "dog", "tree", "house"]


def tiny_pipeline():
    """UNet2DCondition + AutoencoderKL + CLIPTextModel + a WordLevel tokenizer, all random and tiny."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=8
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=8,
            pad_token_id=0,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_pipeline().save_pretrained(path)
    return path


def test_two_unlearning_steps_save_reload_and_generate(saved_pipeline, tmp_path):
    out = tmp_path / "out"
    results = diffusion.main(
        [
            "--pretrained", str(saved_pipeline), "--forget-prompt", "a photo of a cat",
            "--anchor-prompt", "a photo of a dog", "--sd-steps", "2", "--sd-images", "2",
            "--sd-inference-steps", "2", "--sd-lr", "1e-2", "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    steps = results["MUNBa"]["steps"]
    assert len(steps) == 2
    for (
        s
    ) in steps:  # bargaining ran: positive weights, finite losses, a forget loss that is not trivially zero
        assert s["alpha_f"] > 0 and s["alpha_r"] > 0 and s["forget_loss"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["forget_prompts"] == ["a photo of a cat"]
    assert (out / "samples.png").stat().st_size > 0

    original, erased = load_pipeline(saved_pipeline), load_pipeline(out / "pipeline")
    before = dict(original.unet.named_parameters())
    changed = {n for n, p in erased.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "unlearning did not change the UNet"
    assert all(".attn2." in n for n in changed), "--sd-train xattn must only touch cross-attention"
    for a, b in zip(original.text_encoder.parameters(), erased.text_encoder.parameters()):
        assert torch.equal(a, b)
    image = erased("a photo of a cat", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 8, 8) and torch.isfinite(image).all()


def test_full_unet_training_selects_every_weight(saved_pipeline):
    unet = load_pipeline(saved_pipeline).unet
    assert len(trainable_unet_parameters(unet, "full")) == len(list(unet.parameters()))
    assert 0 < len(trainable_unet_parameters(unet, "xattn")) < len(list(unet.parameters()))
    with pytest.raises(ValueError, match="xattn"):
        trainable_unet_parameters(unet, "attention")


def test_hub_id_without_network_gives_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        diffusion.main(
            [
                "--pretrained", "CompVis/stable-diffusion-v1-4", "--forget-prompt", "nudity",
                "--anchor-prompt", "a person", "--out", str(tmp_path),
            ]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--pretrained" in err and "never downloads" in err
    with pytest.raises(FileNotFoundError, match="never downloads"):  # the library function, too
        load_pipeline("CompVis/stable-diffusion-v1-4")


def test_unwritable_out_is_found_before_loading_the_pipeline(saved_pipeline, tmp_path, capsys, monkeypatch):
    from munba_kernels.drivers import stable_diffusion

    def no_work(*a, **k):
        raise AssertionError("--out must be checked before the pipeline is loaded")

    monkeypatch.setattr(stable_diffusion, "load_pipeline", no_work)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        diffusion.main(
            [
                "--pretrained", str(saved_pipeline), "--forget-prompt", "a photo of a cat",
                "--anchor-prompt", "a photo of a dog", "--out", str(tmp_path / "a_file" / "out"),
            ]
        )  # fmt: skip
    assert "--out" in capsys.readouterr().err


def test_pretrained_needs_prompts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        diffusion.main(["--pretrained", str(tmp_path), "--out", str(tmp_path)])
    assert "--forget-prompt" in capsys.readouterr().err
