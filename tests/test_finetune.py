import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from geneava import finetune, models, prompts
from geneava.config import ParamsError


def test_expression_loss_not_silently_ignored(default, prepared, tmp_path):
    p = dict(default["finetune"], alpha=1.0)
    with pytest.raises(ParamsError, match="alpha"):
        finetune.finetune(default["models"], default["prompts"], p, prepared, tmp_path, 64)


def test_saves_only_lora_weights(trained):
    weights = load_file(trained / "lora" / finetune.LORA_FILE)
    assert weights and all("lora" in k for k in weights)
    assert all(k.startswith("unet.") for k in weights)
    # training moved the LoRA-B matrices away from their zero initialisation
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
    history = pd.read_csv(trained / "loss.csv")
    assert list(history["step"]) == [1, 2, 3, 4] and history["loss"].notna().all()


def test_training_is_reproducible(default, prepared, tmp_path):
    p = dict(default["finetune"], max_train_steps=2)
    a = finetune.finetune(default["models"], default["prompts"], p, prepared, tmp_path / "a", 64)
    b = finetune.finetune(default["models"], default["prompts"], p, prepared, tmp_path / "b", 64)
    assert a["loss"].tolist() == b["loss"].tolist()
    wa, wb = (load_file(tmp_path / x / "lora" / finetune.LORA_FILE) for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loaded_lora_changes_generation_and_base_stays_frozen(default, trained):
    corpus = prompts.vocabulary(default["prompts"])
    kw = dict(prompt=["a face of rage"], num_inference_steps=2, height=64, width=64, output_type="np")
    base = models.sdxl_pipeline("tiny", seed=0, corpus=corpus)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    plain = base(generator=torch.Generator().manual_seed(0), **kw).images
    base.load_lora_weights(str(trained / "lora"))
    tuned = base(generator=torch.Generator().manual_seed(0), **kw).images
    assert not (plain == tuned).all()
    # the base weights loaded for generation are the same seeded weights training started from
    fresh = models.sdxl_pipeline("tiny", seed=0, corpus=corpus).unet.state_dict()
    assert all(torch.equal(before[k], fresh[k]) for k in fresh)


def test_time_ids_follow_sdxl_micro_conditioning():
    ids = finetune.time_ids(64, 3, torch.device("cpu"), torch.float32)
    assert ids.shape == (3, 6) and ids[0].tolist() == [64, 64, 0, 0, 64, 64]
