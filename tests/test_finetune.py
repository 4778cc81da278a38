import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from geneava.core import emo135, prompts
from geneava.core.images import read_split
from geneava.networks import models
from geneava.stages import finetune, objective, validation
from geneava.world import standin

from .conftest import ROOT


@pytest.fixture(scope="module")
def parts(default):
    """A tiny SDXL with LoRA, the tiny POSTER and a batch, for single-step checks."""
    torch.manual_seed(0)
    pipe = models.sdxl_pipeline("tiny", seed=0, corpus=prompts.vocabulary(default["prompts"]))
    finetune.prepare_for_training(pipe, rank=4)
    for name, p in pipe.unet.named_parameters():  # LoRA-B starts at zero: move it so gradients differ
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    encoder = models.expression_encoder("tiny", 0)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            ["a face of rage", "a face of delight"], device="cpu", do_classifier_free_guidance=False
        )
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    return pipe, encoder, models.training_scheduler(pipe), pixels, embeds, pooled


def _step(parts, alpha):
    pipe, encoder, sched, pixels, embeds, pooled = parts
    pipe.unet.zero_grad()
    real = encoder.embed(pixels).detach()
    losses = objective.losses_for_batch(
        pipe.unet,
        pipe.vae,
        encoder,
        sched,
        pixels,
        embeds,
        pooled,
        real,
        alpha,
        64,
        torch.Generator().manual_seed(3),
    )
    losses[0].backward()
    grads = {n: p.grad.clone() for n, p in pipe.unet.named_parameters() if p.grad is not None}
    return [x.item() for x in losses], grads


def test_only_lora_gets_gradients_and_alpha_changes_them(parts):
    (loss0, dm0, exp0), g0 = _step(parts, 0.0)
    assert loss0 == dm0 and exp0 == 0.0  # α = 0: the plain diffusion loss
    (loss1, dm1, exp1), g1 = _step(parts, 1.0)
    assert dm1 == dm0 and exp1 > 0 and loss1 == pytest.approx(dm1 + exp1)
    assert g0 and set(g0) == set(g1) and all("lora" in n for n in g1)
    assert all(torch.isfinite(g).all() for g in g1.values())
    assert any(not torch.allclose(g0[n], g1[n]) for n in g0)  # the expression term reaches the LoRA


def test_cached_latents_draw_what_the_encode_draws(parts):
    """cache_latents: the latent is drawn from the cached moments with the draw the encode would make."""
    pipe, encoder, sched, pixels, embeds, pooled = parts
    real = encoder.embed(pixels).detach()
    with torch.no_grad():
        moments = pipe.vae.encode(pixels).latent_dist.parameters
    args = (pipe.unet, pipe.vae, encoder, sched)
    rest = (embeds, pooled, real, 1.0, 64)
    with torch.no_grad():
        encoded = objective.losses_for_batch(*args, pixels, *rest, torch.Generator().manual_seed(3))
        cached = objective.losses_for_batch(*args, None, *rest, torch.Generator().manual_seed(3), moments)
        other = objective.losses_for_batch(*args, None, *rest, torch.Generator().manual_seed(4), moments)
    assert all(torch.equal(a, b) for a, b in zip(encoded, cached, strict=True))
    assert not torch.equal(encoded[0], other[0])  # the draw matters: the test would see a wrong one


def test_windows_are_central_and_at_least_one_cell():
    assert objective.centre_window(16, 0.75) == (2, 12)  # the world's latent: pixels 8..56 of 64
    assert objective.centre_window(128, 0.75) == (16, 96)  # SDXL at 1024 px: 768 px decoded
    assert objective.centre_window(5, 0.01) == (2, 1) and objective.centre_window(8, 1.0) == (0, 8)


@pytest.mark.parametrize("how", ["half", "crop"])
def test_lean_decodes_change_only_the_expression_term(parts, how):
    """Same draws, same L_dm; L_exp sees another view of x̂_0 and still reaches the LoRA."""
    pipe, encoder, sched, pixels, embeds, pooled = parts
    factor = objective.vae_factor(pipe.vae)
    out = {}
    for mode in ("full", how):
        pipe.unet.zero_grad()
        real = encoder.embed(objective.real_view(pixels, factor, mode, 0.5)).detach()
        losses = objective.losses_for_batch(
            pipe.unet, pipe.vae, encoder, sched, pixels, embeds, pooled, real, 1.0, 64,
            torch.Generator().manual_seed(3), exp_decode=mode, exp_crop=0.5,
        )  # fmt: skip
        lora = [p for p in pipe.unet.parameters() if p.requires_grad]
        grads = torch.cat([g.flatten() for g in torch.autograd.grad(losses[2], lora)])  # L_exp's alone
        out[mode] = ([x.item() for x in losses], grads)
    (_, dm_full, exp_full), g_full = out["full"]
    (_, dm, exp), g = out[how]
    assert dm == dm_full and exp > 0 and exp != exp_full
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and not torch.allclose(g, g_full)


def test_the_real_view_is_cut_on_latent_cells():
    """crop: real_view cuts whole latent cells, the pixels decoded_view's window decodes to, not the
    central share of the pixels (at 128 px and 0.7 the two differ: 16..104 against 19..109)."""
    coords = torch.arange(128.0).view(1, 1, 1, 128).expand(1, 1, 128, 128)
    top, n = objective.centre_window(16, 0.7)
    cut = objective.real_view(coords, 8, "crop", 0.7)
    assert cut.shape[-2:] == (n * 8, n * 8) and (top * 8, n * 8) == (16, 88)
    assert cut[0, 0, 0, 0] == 16 and cut[0, 0, 0, -1] == 103


def _shifted_error(a: torch.Tensor, b: torch.Tensor, dy: int, dx: int) -> float:
    """Mean |a - b| over their overlap with `a` moved by (dy, dx) pixels against `b`."""
    h, w = a.shape[-2:]
    ya, xa = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
    yb, xb = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    return float((a[..., ya, xa] - b[..., yb, xb]).abs().mean())


@pytest.mark.parametrize("how", ["full", "half", "crop"])
def test_the_real_view_is_what_the_decoded_window_covers(how):
    """The world's VAE decodes its latent window back onto the pixels real_view cuts: of every placement
    within a latent cell (4 px) either way, the decode matches the real view best where real_view puts it.
    `half` decodes ẑ_0 pooled 2x and compares with the real image whole (POSTER resizes both to its
    input), so its check is the shapes: the world's VAE, trained at full scale, decodes pooled latents
    too blurred for a placement test (measured: neighbouring placements within 6% of each other)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ROOT / "models/world/sdxl/vae")
    faces = [standin.render_face(standin.sample_attributes(c, 0)) for c in emo135.classes()[::40]]
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(f, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for f in faces]
    )
    factor = objective.vae_factor(vae)
    with torch.no_grad():
        z0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        decoded = objective.decoded_view(vae, z0, how, 0.75)
    real = objective.real_view(pixels, factor, how, 0.75)
    assert decoded.shape[-2:] == (({"full": 64, "half": 32, "crop": 48}[how],) * 2)
    assert real.shape[-2:] == ((48, 48) if how == "crop" else (64, 64))  # half: POSTER sees x_0 whole
    if how == "half":
        assert torch.equal(real, pixels)
        return
    errors = {
        (dy, dx): _shifted_error(decoded, real, dy, dx)
        for dy in range(-factor, factor + 1)
        for dx in range(-factor, factor + 1)
    }
    assert min(errors, key=errors.get) == (0, 0), sorted(errors.items(), key=lambda kv: kv[1])[:3]


def test_an_unknown_decode_is_named(parts):
    pipe = parts[0]
    with pytest.raises(ValueError, match="exp_decode 'quarter' is not one of full, half, crop"):
        objective.decoded_view(pipe.vae, torch.zeros(1, 4, 8, 8), "quarter")


def test_no_gradient_reaches_frozen_models(parts):
    pipe, encoder, *_ = parts
    _step(parts, 1.0)
    for module in (pipe.vae, encoder, pipe.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_x0_reconstruction_is_exact_with_the_true_noise(parts):
    sched = parts[2]
    z0 = torch.randn(4, 4, 8, 8)
    noise = torch.randn_like(z0)
    t = torch.tensor([0, 10, 500, 999])
    z_t = sched.add_noise(z0, noise, t)
    assert torch.allclose(objective.predict_z0(z_t, noise, sched.alphas_cumprod, t), z0, atol=1e-3, rtol=1e-4)


def test_saved_lora_loads_into_a_fresh_stock_pipeline(parts, default, tmp_path):
    pipe = parts[0]
    kw = dict(prompt=["a face of rage"], num_inference_steps=2, height=64, width=64, output_type="np")
    trained = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    finetune.save_lora(pipe.unet, tmp_path)
    fresh = models.sdxl_pipeline("tiny", seed=0, corpus=prompts.vocabulary(default["prompts"]))
    plain = fresh(generator=torch.Generator().manual_seed(0), **kw).images
    fresh.load_lora_weights(str(tmp_path))
    loaded = fresh(generator=torch.Generator().manual_seed(0), **kw).images
    assert (loaded == trained).all()
    assert not (plain == trained).all()


def test_kohya_file_loads_through_stock_diffusers_and_renders_the_same_image(parts, default, tmp_path):
    """The kohya-layout file (A1111/ComfyUI) is the same LoRA: stock `load_lora_weights` reads it back and
    renders, on the same seed, the image diffusers' file renders; both differ from the base model's."""
    from geneava.stages import lora_export

    pipe = parts[0]
    lora_file = finetune.save_lora(pipe.unet, tmp_path)
    kohya = load_file(lora_export.save_kohya(lora_file))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert len(downs) == len(load_file(lora_file)) // 2  # one down/up pair per adapted projection
    assert all(kohya[k.replace(".lora_down.weight", ".alpha")].item() == 4 for k in downs)  # alpha = rank

    kw = dict(prompt=["a face of rage"], num_inference_steps=2, height=64, width=64, output_type="np")

    def render(weight_name):
        fresh = models.sdxl_pipeline("tiny", seed=0, corpus=prompts.vocabulary(default["prompts"]))
        if weight_name:
            fresh.load_lora_weights(str(tmp_path), weight_name=weight_name)
        return fresh(generator=torch.Generator().manual_seed(0), **kw).images

    from_diffusers, from_kohya = render(finetune.LORA_FILE), render(lora_export.KOHYA_FILE)
    assert abs(from_kohya - from_diffusers).max() < 1e-6
    assert abs(render(None) - from_diffusers).max() > 1e-3


def test_model_card_describes_the_trained_lora_and_is_reproducible(trained, default, tmp_path):
    from geneava.core.io import sha256_file
    from geneava.stages import lora_export

    card = (trained / "lora" / lora_export.CARD_FILE).read_text()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert f"base_model: {default['models']['sdxl']}" in card
    assert default["prompts"]["template"] in card and "no trigger word" in card
    assert f"sha256 `{metrics['lora_sha256']}`" in card
    kohya_sha = sha256_file(trained / "lora" / lora_export.KOHYA_FILE)
    assert f"`{lora_export.KOHYA_FILE}`: sha256 `{kohya_sha}`" in card
    assert '"rank": 4' in card and f'"steps": {metrics["steps"]}' in card
    assert str(trained) not in card and "/tmp" not in card
    copy = tmp_path / "elsewhere"
    shutil.copytree(trained / "lora", copy)
    again = lora_export.model_card(
        default["models"],
        default["prompts"],
        dict(default["finetune"], max_train_steps=4),
        metrics,
        default["prepare"]["resolution"],
        copy,
    )
    assert again == card  # no clock or machine path in it: the same run writes the same bytes anywhere


def test_the_released_lora_carries_table1_and_the_same_files(trained, default, tmp_path):
    """release's `lora/`: the trained files byte for byte, generate's grid, and the card again with Table 1
    and generate's settings in place of the pointer; whole or absent (built aside), what is missing named."""
    from geneava.core.io import sha256_file, write_csv
    from geneava.stages import lora_export

    outputs = tmp_path / "outputs"
    (outputs / "evaluate").mkdir(parents=True)
    (outputs / "generate" / "finetuned").mkdir(parents=True)
    (outputs / "finetune").symlink_to(trained)
    settings = {"sampler": "euler", "steps": 10, "guidance_scale": 5.0, "resolution": 64}
    write_csv(
        outputs / "generate" / "finetuned" / "manifest.csv", pd.DataFrame([{"row_id": "a", **settings}])
    )
    with pytest.raises(
        FileNotFoundError, match="table1.md not found: run the finetune, generate and evaluate"
    ):
        lora_export.package(outputs, tmp_path / "release" / "lora")
    assert not (tmp_path / "release" / "lora").exists() and not list((tmp_path / "release").glob(".*"))
    (outputs / "evaluate" / "table1.md").write_text("| Model | Exp. |\n|---|---|\n| measured | 7.9 |\n")
    (outputs / "generate" / "grid.png").write_bytes(b"png bytes")
    out = lora_export.package(outputs, tmp_path / "release" / "lora")
    for name in (finetune.LORA_FILE, lora_export.KOHYA_FILE):
        assert sha256_file(out / name) == sha256_file(trained / "lora" / name)
    assert (out / lora_export.SAMPLES).read_bytes() == b"png bytes"
    card = (out / lora_export.CARD_FILE).read_text()
    training = (trained / "lora" / lora_export.CARD_FILE).read_text()
    assert "| measured | 7.9 |" in card and lora_export.GRID in card
    assert "rendered with sampler euler, steps 10, guidance_scale 5.0, resolution 64" in card
    assert lora_export.PENDING[0] in training and lora_export.PENDING[0] not in card
    # everything but the Results section is the training card's
    assert card.split("## Results")[0] == training.split("## Results")[0]
    assert card.split("## Files")[1] == training.split("## Files")[1]
    (outputs / "evaluate" / "table1.md").write_text("| measured again | 7.1 |\n")
    again = (lora_export.package(outputs, out) / lora_export.CARD_FILE).read_text()
    assert "| measured again | 7.1 |" in again and "| measured | 7.9 |" not in again
    assert sorted(p.name for p in out.parent.iterdir()) == ["lora"]  # no temporary folder left


def test_the_card_names_a_lean_expression_loss_and_not_the_papers():
    from geneava.stages import lora_export

    base = {"rank": 4, "lr": 1e-6, "epochs": 8, "batch_size": 1, "alpha": 1.0, "seed": 0}
    base |= {"mixed_precision": "no", "exp_crop": 0.75}
    full = lora_export._training_settings({**base, "exp_decode": "full"})
    half = lora_export._training_settings({**base, "exp_decode": "half"})
    crop = lora_export._training_settings({**base, "exp_decode": "crop"})
    assert "exp_decode" not in full and "exp_crop" not in full
    assert half["exp_decode"] == "half" and "exp_crop" not in half
    assert crop["exp_decode"] == "crop" and crop["exp_crop"] == 0.75


def test_the_worlds_card_claims_no_third_party_faces_or_weights(default, trained):
    from geneava.stages import lora_export

    card = (trained / "lora" / lora_export.CARD_FILE).read_text()  # trained on the world's base model
    assert default["models"]["sdxl"] == "models/world/sdxl"
    assert "procedural stand-in for Emo135" in card and "Emo135 (the fine-tuning images)" not in card
    paper = lora_export.model_card(
        {**default["models"], "sdxl": lora_export.PAPER_BASE},
        default["prompts"],
        dict(default["finetune"], max_train_steps=4),
        json.loads((trained / "metrics.json").read_text()),
        1024,
        trained / "lora",
    )
    assert "CreativeML Open RAIL++-M" in paper and "Emo135 (the fine-tuning images)" in paper


def test_saves_lora_and_loss_log(trained):
    weights = load_file(trained / "lora" / finetune.LORA_FILE)
    assert weights and all("lora" in k and k.startswith("unet.") for k in weights)
    history = pd.read_csv(trained / "loss.csv")
    assert list(history["step"]) == [1, 2, 3, 4]
    assert (history["loss_exp"] > 0).all()
    assert history["loss"].tolist() == pytest.approx((history["loss_dm"] + history["loss_exp"]).tolist())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["processes"] == 1


def test_epoch_order_is_seeded_and_sharded():
    a = finetune.epoch_batches(10, 2, seed=0, epoch=0, rank=0, world=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert a == finetune.epoch_batches(10, 2, 0, 0, 0, 1) and a != finetune.epoch_batches(10, 2, 0, 1, 0, 1)
    r0, r1 = (finetune.epoch_batches(10, 2, 0, 0, r, 2) for r in (0, 1))
    assert len(r0) == len(r1) == 2 and not {i for b in r0 for i in b} & {i for b in r1 for i in b}


def _params_file(tmp_path, **finetune_over) -> "os.PathLike":
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"]["default"].update(finetune_over)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(prepared, out, params_file):
    return [
        sys.executable,
        "-m",
        "geneava.stages.finetune",
        "--prepare-dir",
        str(prepared),
        "--out-dir",
        str(out),
        "--params",
        str(params_file),
    ]


def test_killed_run_resumes_to_the_same_weights(prepared, tmp_path):
    """SIGKILL mid-run, resume, and the result equals an uninterrupted run bit for bit (CPU)."""
    params_file = _params_file(
        tmp_path, epochs=6, checkpoint_every=4, batch_size=2, validation_every=5, validation_steps=2
    )  # 36 steps
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(prepared, killed, params_file),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list((killed / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((killed / "checkpoints").glob("step-*")), "no checkpoint was written"
    assert not (killed / "lora").exists(), "the run finished before it was killed"
    subprocess.run(_cli(prepared, killed, params_file), check=True, capture_output=True)

    whole = tmp_path / "whole"
    subprocess.run(_cli(prepared, whole, params_file), check=True, capture_output=True)
    a, b = (load_file(d / "lora" / finetune.LORA_FILE) for d in (killed, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (pd.read_csv(d / "loss.csv") for d in (killed, whole))
    assert la.equals(lb) and len(la) == 36
    # the validation series survives the kill: the same snapshots, the same bytes
    sa, sb = (validation.series(d) for d in (killed, whole))
    assert [s for s, _ in sa] == [s for s, _ in sb] == [0, 5, 10, 15, 20, 25, 30, 35, 36]
    assert all(pa.read_bytes() == pb.read_bytes() for (_, pa), (_, pb) in zip(sa, sb, strict=True))
    # TensorBoard: the steps the killed run logged after its checkpoint are purged, none is lost or doubled
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea, eb = (EventAccumulator(str(d / validation.LOGS)).Reload().Scalars("loss") for d in (killed, whole))
    assert [e.step for e in ea] == [e.step for e in eb] == list(range(1, 37))
    assert [e.value for e in ea] == [e.value for e in eb]


def test_changed_validation_settings_keep_the_checkpoints_and_restart_the_series(prepared, default, tmp_path):
    """Validation settings never change the weights: a rerun with other expressions resumes training from
    its checkpoint; the series restarts at that step, rendered with the new settings."""
    res = default["prepare"]["resolution"]
    base = dict(
        default["finetune"], max_train_steps=4, checkpoint_every=2, validation_every=2, validation_steps=2
    )
    finetune.finetune(default["models"], default["prompts"], base, prepared, tmp_path, res)
    assert [s for s, _ in validation.series(tmp_path)] == [0, 2, 4]
    first = (tmp_path / "lora" / finetune.LORA_FILE).read_bytes()
    other = dict(base, validation_expressions=["amazement", "rage"])
    finetune.finetune(default["models"], default["prompts"], other, prepared, tmp_path, res)
    assert [s for s, _ in validation.series(tmp_path)] == [2, 4]  # resumed at 2, not retrained from 0
    assert Image.open(validation.series(tmp_path)[0][1]).size == (2 * res, res)
    assert (tmp_path / "lora" / finetune.LORA_FILE).read_bytes() == first


def test_validation_and_tensorboard_leave_the_training_untouched(prepared, default, tmp_path):
    """Validation renders draw from their own generators: the LoRA is the same bytes with them on or off.
    TensorBoard gets every step's three losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = default["prepare"]["resolution"]
    for name, every in (("on", 2), ("off", None)):
        p = dict(default["finetune"], max_train_steps=3, validation_every=every, validation_steps=2)
        finetune.finetune(default["models"], default["prompts"], p, prepared, tmp_path / name, res)
    on, off = (load_file(tmp_path / n / "lora" / finetune.LORA_FILE) for n in ("on", "off"))
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    assert [s for s, _ in validation.series(tmp_path / "on")] == [0, 2, 3]
    assert validation.series(tmp_path / "off") == []
    strip = Image.open(validation.series(tmp_path / "on")[0][1])
    assert strip.size == (res * len(default["finetune"]["validation_expressions"]), res)

    events = EventAccumulator(str(tmp_path / "on" / validation.LOGS)).Reload()
    for tag in ("loss", "loss_dm", "loss_exp"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3]
    history = pd.read_csv(tmp_path / "on" / "loss.csv")
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(history["loss"].tolist())


def test_cached_latents_train_the_same_lora(prepared, default, tmp_path, monkeypatch):
    """One encode per image (batches of 16) instead of one per step (batches of 8): the same mathematics;
    the bits may differ in the last place where the encoder's batch differs."""
    res = default["prepare"]["resolution"]
    loaded = {}
    real_load = finetune.load_images

    def counting(paths, *a, **k):
        loaded[name] = loaded.get(name, 0) + len(paths)
        return real_load(paths, *a, **k)

    monkeypatch.setattr(finetune, "load_images", counting)
    for name, cache in (("cached", True), ("encoded", False)):
        p = dict(default["finetune"], max_train_steps=3, cache_latents=cache, validation_every=None)
        finetune.finetune(default["models"], default["prompts"], p, prepared, tmp_path / name, res)
    n, bs, seed = (
        len(read_split(prepared, "finetune")),
        default["finetune"]["batch_size"],
        default["finetune"]["seed"],
    )
    batches = [b for e in range(3) for b in finetune.epoch_batches(n, bs, seed, e, 0, 1)][:3]
    # both read every image once for E_exp(x0); the cached run once more for the moments and never per step,
    # the other each step's batch
    assert loaded["cached"] == 2 * n and loaded["encoded"] == n + sum(len(b) for b in batches)
    a, b = (load_file(tmp_path / n / "lora" / finetune.LORA_FILE) for n in ("cached", "encoded"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)
    la, lb = (pd.read_csv(tmp_path / n / "loss.csv") for n in ("cached", "encoded"))
    assert la["loss"].tolist() == pytest.approx(lb["loss"].tolist(), rel=1e-5)


def _batches_run(monkeypatch) -> list:
    """Records each micro-batch the stage trains on (a resumed run trains only those after its checkpoint)."""
    calls, real = [], finetune.losses_for_batch
    monkeypatch.setattr(finetune, "losses_for_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_checkpoints_of_other_settings_are_not_resumed(prepared, tmp_path, default, monkeypatch):
    base = dict(default["finetune"], max_train_steps=4, checkpoint_every=2)
    finetune.finetune(default["models"], default["prompts"], base, prepared, tmp_path, 64)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]
    calls = _batches_run(monkeypatch)
    other = dict(base, lr=3e-4)
    history = finetune.finetune(default["models"], default["prompts"], other, prepared, tmp_path, 64)
    assert list(history["step"]) == [1, 2, 3, 4] and len(calls) == 4  # started from scratch


def test_checkpoints_of_a_base_retrained_in_place_are_not_resumed(prepared, tmp_path, default, monkeypatch):
    base = dict(default["finetune"], max_train_steps=4, checkpoint_every=2)
    finetune.finetune(default["models"], default["prompts"], base, prepared, tmp_path, 64)
    real = finetune.source_fingerprint
    monkeypatch.setattr(finetune, "source_fingerprint", lambda s: real(s) + "-retrained")
    calls = _batches_run(monkeypatch)
    history = finetune.finetune(default["models"], default["prompts"], base, prepared, tmp_path, 64)
    assert list(history["step"]) == [1, 2, 3, 4] and len(calls) == 4  # other weights: from scratch


def test_only_settings_that_change_the_weights_discard_checkpoints(prepared, tmp_path, default, monkeypatch):
    base = dict(default["finetune"], max_train_steps=4, checkpoint_every=2, exp_decode="full")
    finetune.finetune(default["models"], default["prompts"], base, prepared, tmp_path, 64)
    calls = _batches_run(monkeypatch)
    finetune.finetune(default["models"], default["prompts"], dict(base, exp_crop=0.5), prepared, tmp_path, 64)
    assert len(calls) == 2  # the full decode never reads exp_crop: resumed at step 2
    calls.clear()
    crop = dict(base, exp_decode="crop", exp_crop=0.5)
    finetune.finetune(default["models"], default["prompts"], crop, prepared, tmp_path, 64)
    assert len(calls) == 4  # a lean decode trains other weights: from scratch
    assert objective.key_settings(dict(base, exp_crop=0.5)) == objective.key_settings(base)
    assert "exp_decode" not in objective.key_settings(base)  # keys made before the option still match


@pytest.mark.e2e
def test_accelerate_launch_with_two_cpu_processes(prepared, tmp_path):
    params_file = _params_file(tmp_path, num_processes=2, max_train_steps=3)
    history = finetune.run(None, prepared, tmp_path / "out", params_file)
    assert list(history["step"]) == [1, 2, 3]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    weights = load_file(tmp_path / "out" / "lora" / finetune.LORA_FILE)
    assert weights and all("lora" in k for k in weights)
