import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from geneava.core import prompts
from geneava.networks import models
from geneava.stages.finetune import add_lora


@pytest.fixture(scope="module")
def corpus(params):
    return prompts.vocabulary(params["prompts"]["default"])


def test_tiny_sdxl_has_sdxls_architecture(corpus):
    pipe = models.sdxl_pipeline("tiny", seed=0, corpus=corpus)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    # cross-attention sees both encoders' hidden states; the added embedding sees 6 time ids + pooled text
    assert (
        cfg.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + (
        pipe.text_encoder_2.config.projection_dim
    )
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_same_seed_same_weights_other_seed_other_weights(corpus):
    a = models.sdxl_pipeline("tiny", seed=0, corpus=corpus).unet.state_dict()
    b = models.sdxl_pipeline("tiny", seed=0, corpus=corpus).unet.state_dict()
    c = models.sdxl_pipeline("tiny", seed=1, corpus=corpus).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_generates_seeded_images(corpus):
    pipe = models.sdxl_pipeline("tiny", seed=0, corpus=corpus)
    kw = dict(
        prompt=["a face of rage", "a face of delight"],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
    )
    one = pipe(generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw).images
    two = pipe(generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw).images
    assert one.shape == (2, 64, 64, 3)
    assert (one == two).all()
    assert not (one[0] == one[1]).all()


def test_lora_makes_only_adapters_trainable(corpus):
    unet = models.sdxl_pipeline("tiny", seed=0, corpus=corpus).unet
    trainable = add_lora(unet, rank=4)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and len(names) == len(trainable)
    assert all("lora" in n for n in names)
    assert any("to_q" in n for n in names) and any("to_out" in n for n in names)


def test_missing_real_weights_fail_with_advice(tmp_path):
    with pytest.raises(RuntimeError, match="tiny"):
        models.sdxl_pipeline(str(tmp_path / "no-such-model"), local_files_only=True)


def test_tiny_needs_a_corpus():
    with pytest.raises(ValueError, match="corpus"):
        models.sdxl_pipeline("tiny")


def test_training_scheduler_matches_sdxl_schedule(corpus):
    sched = models.training_scheduler(models.sdxl_pipeline("tiny", seed=0, corpus=corpus))
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.alphas_cumprod[0] > 0.99 and sched.alphas_cumprod[-1] < 0.01


def test_every_sampler_params_allow_is_built_on_the_models_own_schedule(corpus):
    """schema.SAMPLERS and the factory agree; each solver keeps SDXL's noise schedule and timestep
    spacing, and renders images of its own (euler is the model's scheduler, untouched)."""
    from diffusers import EulerDiscreteScheduler

    from geneava.core import schema

    assert schema.SAMPLERS == tuple(models.SAMPLERS)
    kw = dict(prompt=["a face of rage"], num_inference_steps=3, height=64, width=64, output_type="np")
    images = {}
    for name in schema.SAMPLERS:
        pipe = models.sdxl_pipeline("tiny", seed=0, corpus=corpus)
        own = pipe.scheduler
        assert models.use_sampler(pipe, name) is pipe
        if name == "euler":
            assert pipe.scheduler is own and type(own) is EulerDiscreteScheduler
        else:
            assert type(pipe.scheduler) is models.SAMPLERS[name][0]
        for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "timestep_spacing"):
            assert pipe.scheduler.config[k] == own.config[k], k
        images[name] = pipe(generator=[torch.Generator().manual_seed(1)], **kw).images
    assert not (images["euler"] == images["dpmpp_2m"]).all()
    assert not (images["dpmpp_2m"] == images["unipc"]).all()
    assert not (images["euler"] == images["unipc"]).all()
    with pytest.raises(ValueError, match="dpmpp_2m"):
        models.use_sampler(pipe, "ddim")


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_tiny_image_encoders_embed_in_batches(kind):
    enc = models.image_encoder(kind, "tiny", seed=0)
    images = torch.rand(5, 3, 40, 40) * 2 - 1
    whole = enc.embed(images)
    assert whole.shape == (5, 32) and torch.isfinite(whole).all()
    assert torch.allclose(enc.embed(images, batch=2), whole, atol=1e-6)
    again = models.image_encoder(kind, "tiny", seed=0).embed(images)
    assert torch.equal(again, whole)
    assert not torch.allclose(whole[0], whole[1])


def test_missing_encoder_weights_say_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="clip-vit-large-patch14"):
        models.image_encoder("clip", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown image encoder"):
        models.image_encoder("siglip")
