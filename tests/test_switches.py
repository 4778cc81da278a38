"""The paper profile's switches (params.yaml finetune.paper, generate.paper), each run on CPU through the
stage's own code path with the default profile's small models, and each checked by an effect it cannot have
when it is silently ignored (a module's state, what ran, how often), besides "the result is still right".

Fine-tuning: bf16 mixed precision, gradient accumulation with a resume cut mid-window, gradient
checkpointing of the UNet and of the VAE decode, pruning to checkpoints_total_limit. Generation: VAE slicing,
VAE tiling, channels-last, torch.compile. (Resume with accumulation 1 is test_finetune's
test_killed_run_resumes_to_the_same_weights; these switches reaching the resume keys is test_resume's
test_every_generate_parameter_reaches_the_row_keys.)
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from geneava.core import checkpoints
from geneava.stages import finetune, generate

# ----------------------------------------------------------------- fine-tuning


def _reset_accelerate():
    # accelerate keeps one process-wide state and refuses another mixed_precision in it; accelerate's own
    # tests reset it between cases the same way. (Each stage is a process of its own outside the tests.)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _finetune(default, prepared, out, **over) -> pd.DataFrame:
    """The finetune stage in this process: the default profile with `over`, validation renders off (they
    are no part of training; the hooks below watch training alone)."""
    _reset_accelerate()
    try:
        return finetune.finetune(
            default["models"],
            default["prompts"],
            dict(default["finetune"], validation_every=None, **over),
            prepared,
            out,
            default["prepare"]["resolution"],
        )
    finally:
        _reset_accelerate()


def _lora(out) -> dict:
    return load_file(out / "lora" / finetune.LORA_FILE)


class Watch:
    """What a finetune run did inside: its models (for their state), each LoRA parameter's gradient after
    each backward, the dtypes the UNet's linear layers computed in and the VAE decode's output dtype, and
    the modules run through torch.utils.checkpoint."""

    def __init__(self, monkeypatch):
        self.pipe = None
        self.grads: dict[str, list[torch.Tensor]] = {}  # parameter name -> its gradient at each backward
        self.unet_dtypes, self.decode_dtypes, self.checkpointed = set(), set(), []
        real_models = finetune.training_models

        def training_models(*args, **kwargs):
            pipe, encoder = real_models(*args, **kwargs)
            self.pipe = pipe
            for name, p in pipe.unet.named_parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(
                        lambda p, name=name: self.grads.setdefault(name, []).append(p.grad.detach().clone())
                    )
            for m in pipe.unet.modules():
                if type(m) is torch.nn.Linear:
                    m.register_forward_hook(lambda m, i, o: self.unet_dtypes.add(o.dtype))
            pipe.vae.decoder.register_forward_hook(lambda m, i, o: self.decode_dtypes.add(o.dtype))
            return pipe, encoder

        real_checkpoint = torch.utils.checkpoint.checkpoint

        def checkpoint(function, *args, **kwargs):
            self.checkpointed.append(getattr(function, "__self__", None))
            return real_checkpoint(function, *args, **kwargs)

        monkeypatch.setattr(finetune, "training_models", training_models)
        # diffusers' enable_gradient_checkpointing looks this up at each call
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)


RUNS = {  # two steps, every switch at the default profile's value unless named
    "plain": {},
    "bf16": {"mixed_precision": "bf16"},
    "plain, L_dm only": {"alpha": 0.0},
    "bf16, L_dm only": {"alpha": 0.0, "mixed_precision": "bf16"},
    "checkpointing": {"gradient_checkpointing": True},
    "bf16+checkpointing": {"mixed_precision": "bf16", "gradient_checkpointing": True},  # as on the GPU
}


@pytest.fixture(scope="module")
def runs(default, prepared, tmp_path_factory):
    """RUNS by name: (history, LoRA, Watch), each made once, on demand."""
    made = {}

    def get(name):
        if name not in made:
            out = tmp_path_factory.mktemp("run")
            with pytest.MonkeyPatch.context() as mp:
                watch = Watch(mp)
                history = _finetune(default, prepared, out, max_train_steps=2, **RUNS[name])
            made[name] = (history, _lora(out), watch)
        return made[name]

    return get


def _relative_error(g: torch.Tensor, reference: torch.Tensor) -> float:
    return float((g - reference).norm() / reference.norm())


@pytest.mark.parametrize(
    ("objective", "loss_rel", "grad_rel"),
    [
        # L_dm alone: what bf16 costs a UNet. bf16 keeps 8 significant bits (steps of 2**-8 = 0.4%); the
        # losses, means of many rounded terms, agree to 5e-4 and the gradients to 1.0% and 1.4% at the two
        # steps (measured); the bounds are about twice that
        pytest.param("L_dm only", {"loss": 1e-3}, (0.02, 0.03), id="L_dm"),
        # the paper's L = L_dm + L_exp: the same, but x̂_0 = (z_t - sqrt(1 - ᾱ_t) ε_θ) / sqrt(ᾱ_t) multiplies
        # ε_θ's rounding by sqrt(1 - ᾱ_t) / sqrt(ᾱ_t), 10 at t = 936 in these batches: L_exp differs by
        # 1.2% and its gradients by 27% at the first step and 12% at the second, measured (bounds: twice
        # that, 1.5 times the first step's). Not a bug: the method's own sensitivity to the precision of ε_θ
        # at high noise (fp16, the paper profile's choice, rounds 8 times finer)
        pytest.param("L", {"loss_dm": 1e-3, "loss_exp": 0.025}, (0.4, 0.25), id="L"),
    ],
)
def test_bf16_mixed_precision_autocasts_the_unet_and_keeps_the_decode_in_fp32(
    runs, objective, loss_rel, grad_rel
):
    suffix = ", L_dm only" if objective == "L_dm only" else ""
    ref_history, _, ref = runs("plain" + suffix)
    history, lora, bf16 = runs("bf16" + suffix)
    assert ref.unet_dtypes == {torch.float32}
    # under mixed_precision: bf16 the UNet's matmuls ran in bf16 (accelerate's CPU autocast) ...
    assert torch.bfloat16 in bf16.unet_dtypes
    # ... while x̂_0's decode for L_exp stays fp32 (objective.losses_for_batch) and the LoRA trains in fp32
    assert bf16.decode_dtypes == (set() if suffix else {torch.float32})
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert not history["loss"].equals(ref_history["loss"])  # not the fp32 numbers ...
    for col, rel in loss_rel.items():  # ... but those numbers, rounded
        assert history[col].tolist() == pytest.approx(ref_history[col].tolist(), rel=rel), col
    for step in (0, 1):
        g, g0 = (torch.cat([w.grads[n][step].flatten() for n in sorted(w.grads)]) for w in (bf16, ref))
        assert _relative_error(g, g0) < grad_rel[step], step
    assert all(torch.isfinite(v).all() for v in lora.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradient_checkpointing_is_on_in_the_unet_and_the_vae_decode_and_changes_no_number(runs, precision):
    base, on = ("plain", "checkpointing") if precision == "fp32" else ("bf16", "bf16+checkpointing")
    ref_history, ref_lora, ref = runs(base)
    history, lora, watch = runs(on)
    unet, vae = watch.pipe.unet, watch.pipe.vae
    assert unet.is_gradient_checkpointing and vae.is_gradient_checkpointing
    assert not ref.pipe.unet.is_gradient_checkpointing and not ref.pipe.vae.is_gradient_checkpointing
    assert not ref.checkpointed
    # and it really ran in training: UNet blocks and the blocks of the VAE decoder that x̂_0 is decoded and
    # backpropagated through went through torch.utils.checkpoint (the encoder runs without grad: it is not)
    ran = {id(m) for m in watch.checkpointed}
    assert ran & {id(m) for m in unet.modules()}
    assert ran & {id(m) for m in vae.decoder.modules()}
    assert not ran & {id(m) for m in vae.encoder.modules()}
    # recomputing activations in backward changes no number: the same losses, gradients and LoRA (float
    # tolerance; on this CPU they are equal bit for bit)
    pd.testing.assert_frame_equal(history, ref_history, rtol=1e-6, atol=0)
    assert watch.grads.keys() == ref.grads.keys() and len(next(iter(watch.grads.values()))) == 2
    for name, grads in watch.grads.items():
        for g, g0 in zip(grads, ref.grads[name], strict=True):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7)
    assert lora.keys() == ref_lora.keys()
    for k in lora:
        torch.testing.assert_close(lora[k], ref_lora[k], rtol=1e-5, atol=1e-7)


class Killed(Exception):
    """Stands in for SIGKILL: nothing after it runs."""


def test_accumulated_steps_resume_from_a_cut_mid_window_to_the_uninterrupted_result(
    default, prepared, tmp_path, monkeypatch
):
    """12 images in micro-batches of 2 (6 an epoch), 3 per optimizer step: 6 steps are 18 micro-batches,
    with a checkpoint every 2 steps. The run is cut inside the window after the step-4 checkpoint."""
    p = dict(batch_size=2, gradient_accumulation_steps=3, max_train_steps=6, checkpoint_every=2)
    real = finetune.losses_for_batch
    calls = {"n": 0, "kill_at": None}
    own = []  # each micro-batch's own gradient, d(its loss)/d(LoRA)

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise Killed
        losses = real(*args, **kwargs)
        if len(own) < 6:  # the first two windows of the uninterrupted run
            lora = [q for q in args[0].parameters() if q.requires_grad]  # the optimizer's order
            grads = torch.autograd.grad(losses[0], lora, retain_graph=True)  # leaves .grad alone
            own.append(torch.cat([g.flatten() for g in grads]))
        return losses

    monkeypatch.setattr(finetune, "losses_for_batch", counted)

    stepped = []  # the gradient each AdamW step was taken with

    def before_step(optimizer, args, kwargs):
        stepped.append(torch.cat([q.grad.flatten() for g in optimizer.param_groups for q in g["params"]]))

    with pytest.MonkeyPatch.context() as mp:
        watch = Watch(mp)  # .grad after each backward
        hook = register_optimizer_step_pre_hook(before_step)
        try:
            whole = _finetune(default, prepared, tmp_path / "whole", **p)
        finally:
            hook.remove()
    assert calls["n"] == 18 and list(whole["step"]) == [1, 2, 3, 4, 5, 6]  # 3 micro-batches a step
    assert list(whole["epoch"]) == [0, 0, 1, 1, 2, 2]
    # the gradients accumulate: after micro-batch k of a window .grad holds the mean so far (accelerate
    # divides each loss by 3) of the window's own gradients, a window starts from zero, and AdamW steps once
    # a window, with the mean of its three (float sums in another order: 1-1.5e-6 relative, measured)
    names = [n for n, q in watch.pipe.unet.named_parameters() if q.requires_grad]
    after = [torch.cat([watch.grads[n][k].flatten() for n in names]) for k in range(6)]
    assert len(own) == 6 and len(stepped) == 6
    for w in (0, 1):
        window = own[3 * w : 3 * w + 3]
        for k in range(3):
            rel = _relative_error(after[3 * w + k], sum(window[: k + 1]) / 3)
            assert rel < 1e-5, (w, k)
        rel = _relative_error(stepped[w], sum(window) / 3)
        assert rel < 1e-5, w
        torch.testing.assert_close(stepped[w], after[3 * w + 2], rtol=0, atol=0)  # the window's .grad
        # not the last micro-batch's gradient alone, what zeroing .grad each micro-batch would leave (they
        # differ by 0.96 and 1.24 of its norm, measured)
        assert _relative_error(stepped[w], window[-1] / 3) > 0.5, w

    killed = tmp_path / "killed"
    calls.update(n=0, kill_at=14)  # micro-batches 12 and 13 (0-based) of the window 12-14 ran: cut there
    with pytest.raises(Killed):
        _finetune(default, prepared, killed, **p)
    assert [c.name for c in sorted((killed / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    last = killed / "checkpoints" / "step-000004"
    assert json.loads((last / "state.json").read_text())["micro"] == 12
    # 4 optimizer updates in 12 micro-batches: the skipped optimizer.step() calls did not reach AdamW
    adam = torch.load(last / "optimizer.pt", weights_only=True)["state"]
    assert adam and {float(s["step"]) for s in adam.values()} == {4.0}

    calls.update(n=0, kill_at=None)
    resumed = _finetune(default, prepared, killed, **p)
    assert calls["n"] == 6  # from micro-batch 12: the cut window was made again whole, nothing else
    pd.testing.assert_frame_equal(resumed, whole)
    a, b = _lora(killed), _lora(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit (CPU)
    assert pd.read_csv(killed / "loss.csv").equals(pd.read_csv(tmp_path / "whole" / "loss.csv"))


def test_checkpoints_are_pruned_to_the_total_limit(default, prepared, tmp_path, monkeypatch):
    on_disk = []
    real = checkpoints.save

    def save(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        on_disk.append(sorted(p.name for p in folder.iterdir()))

    monkeypatch.setattr(checkpoints, "save", save)
    # a limit other than the default profile's 2; checkpoints after steps 1-5 (none at the last step)
    _finetune(default, prepared, tmp_path, max_train_steps=6, checkpoint_every=1, checkpoints_total_limit=3)
    steps = [[f"step-{s:06d}" for s in range(max(1, n - 2), n + 1)] for n in range(1, 6)]
    assert on_disk == steps  # the newest 3 after every save: never more on disk
    run_id = json.loads((tmp_path / "checkpoints" / "step-000005" / "state.json").read_text())["run_id"]
    assert checkpoints.latest(tmp_path / "checkpoints", run_id).name == "step-000005"


# ----------------------------------------------------------------- generation


def _generate(default, out, lora, **over):
    """The generate stage (QC off) on two rows, one batch; (images as int arrays, the pipeline it built,
    the latent shapes its VAE decoder was called with)."""
    made, decoder_calls = {}, []
    real = generate.build_pipeline

    def build_pipeline(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.vae.decoder.register_forward_pre_hook(lambda m, args: decoder_calls.append(tuple(args[0].shape)))
        made["pipe"] = pipe
        return pipe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "build_pipeline", build_pipeline)
        p = {**default["generate"], "qc": False, "limit": 2, **over}
        m = generate.generate(default["models"], default["prompts"], p, out, lora)
    images = np.stack([np.asarray(Image.open(out / f), dtype=np.int16) for f in m["file"]])
    return images, made["pipe"], decoder_calls


@pytest.fixture(scope="module")
def plain(default, trained, tmp_path_factory):
    """The two rows with every switch off (the default profile: 64 px, 20 steps)."""
    return _generate(default, tmp_path_factory.mktemp("plain"), trained / "lora")


def _assert_float_noise(images, reference):
    """Equal up to float rounding: another order of the same float32 sums (other kernels, batch shapes)
    moves a pixel by one level where its value lies next to a rounding boundary of the uint8 PNG; twenty
    denoising steps may grow that to two. A real change of the computation moves most pixels."""
    diff = np.abs(images - reference)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_vae_slicing_decodes_one_image_at_a_time(default, trained, plain, tmp_path):
    images, pipe, calls = _generate(default, tmp_path, trained / "lora", vae_slicing=True)
    assert pipe.vae.use_slicing and not plain[1].vae.use_slicing
    assert plain[2] == [(2, 4, 16, 16)]  # one decode of the batch of two ...
    assert calls == [(1, 4, 16, 16)] * 2  # ... or one per image
    _assert_float_noise(images, plain[0])


def test_vae_tiling_decodes_tiles_of_a_larger_image(default, trained, plain, tmp_path):
    """diffusers tiles only a latent larger than its tile, sample_size / 2**(levels - 1): the world VAE's
    sample_size is 64 px (16 latent px), so at the default 64 px the switch changes nothing, and the
    check renders 128 px (a 32 x 32 latent: 3 x 3 tiles of up to 16 at a stride of 12)."""
    images, pipe, calls = _generate(default, tmp_path / "64", trained / "lora", vae_tiling=True)
    assert pipe.vae.use_tiling and pipe.vae.tile_latent_min_size == 16
    assert calls == plain[2] and (images == plain[0]).all()  # not larger than a tile: the plain decode

    big = {"resolution": 128, "steps": 8}
    untiled, _, whole_calls = _generate(default, tmp_path / "untiled", trained / "lora", **big)
    tiled, _, tile_calls = _generate(default, tmp_path / "tiled", trained / "lora", vae_tiling=True, **big)
    assert whole_calls == [(2, 4, 32, 32)]
    assert sorted(set(tile_calls)) == [(2, 4, 8, 8), (2, 4, 8, 16), (2, 4, 16, 8), (2, 4, 16, 16)]
    assert len(tile_calls) == 9

    # Tiled decoding is an approximation, not float noise: each tile is decoded alone, so the decoder's
    # GroupNorm statistics and its mid-block attention see a tile, not the image, and seams are blended
    # over 16 px (diffusers' own pipeline tests allow a max difference of 0.2 of the range for their toy
    # VAEs). The world's VAE is trained at 64 px only; at 128 px its tiles come out with more contrast than
    # the whole image (measured 2026-12-05: mean distances 19 and 31 levels, as far as another seed's image
    # at 32), so the bound is on the picture's structure: each tiled image correlates with its untiled
    # image pixel by pixel far more than another seed's image does (measured: 0.88 against 0.54).
    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    other_seed = corr(untiled[0], untiled[1])
    for t, u in zip(tiled, untiled, strict=True):
        assert corr(t, u) > max(0.75, other_seed + 0.2), (corr(t, u), other_seed)
    assert not (tiled == untiled).all()


def test_channels_last_unet_gives_the_same_images(default, trained, plain, tmp_path):
    images, pipe, _ = _generate(default, tmp_path, trained / "lora", channels_last=True)
    convs = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not all(
        c.weight.is_contiguous(memory_format=torch.channels_last)
        for c in plain[1].unet.modules()
        if isinstance(c, torch.nn.Conv2d) and c.kernel_size != (1, 1)
    )
    _assert_float_noise(images, plain[0])


@pytest.mark.e2e  # slow: inductor compiles the UNet with its LoRA in 134 s on 2 CPU cores (24 s if cached)
def test_compiled_unet_gives_the_same_images(default, trained, plain, tmp_path):
    """mode="reduce-overhead" asks for CUDA graphs, which inductor skips on a CPU: this is the compiled
    graph (fullgraph: one graph, no break), not the CUDA graphs of a GPU run."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    images, pipe, _ = _generate(default, tmp_path, trained / "lora", compile=True)
    assert isinstance(pipe.unet, OptimizedModule)
    # dynamo captured the UNet as exactly one graph over the 20 denoising steps: no break, no recompile
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert sum(counters["graph_break"].values()) == breaks
    _assert_float_noise(images, plain[0])
