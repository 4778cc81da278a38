import copy
import subprocess
import sys

import pytest
import yaml

from geneava.core import config, schema
from geneava.core.config import ParamsError

from .conftest import ROOT


def test_repo_params_validate(params):
    assert params["profile"] in config.PROFILES
    for stage in config.SCHEMA:
        assert set(params[stage]) >= set(config.PROFILES)


def test_paper_profile_holds_the_papers_settings(params):
    """docs/paper.md: SDXL base 1.0, LoRA rank 4, lr 1e-6, 8 epochs, batch 1, Adam (0.9, 0.999),
    wd 1e-2, α 1.0, 8/class fine-tuning, 50/class evaluation, 7 x 2 x 7 = 98 prompts per expression."""
    ft = params["finetune"]["paper"]
    assert params["models"]["paper"]["sdxl"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (ft["rank"], ft["lr"], ft["epochs"], ft["batch_size"]) == (4, 1e-6, 8, 1)
    assert (ft["adam_beta1"], ft["adam_beta2"], ft["weight_decay"], ft["alpha"]) == (0.9, 0.999, 1e-2, 1.0)
    prep = params["prepare"]["paper"]
    assert (prep["finetune_per_class"], prep["eval_per_class"], prep["resolution"]) == (8, 50, 1024)
    pr = params["prompts"]["paper"]
    assert pr["races"] == [
        "White",
        "Black",
        "Indian",
        "East Asian",
        "Southeast Asian",
        "Middle Eastern",
        "Latino",
    ]
    assert len(pr["genders"]) * len(pr["ages"]) * len(pr["races"]) == 98
    assert params["generate"]["paper"]["limit"] is None
    assert params["generate"]["paper"]["resolution"] == 1024


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    "path, value, key",
    [
        (("profile",), "fast", "profile"),
        (("finetune", "default", "lr"), -1.0, "finetune.default.lr"),
        (("finetune", "paper", "rank"), "four", "finetune.paper.rank"),
        (("finetune", "default", "epochs"), 1.5, "finetune.default.epochs"),
        (("finetune", "default", "mixed_precision"), "fp8", "finetune.default.mixed_precision"),
        (("generate", "default", "steps"), 0, "generate.default.steps"),
        (("generate", "default", "limit"), True, "generate.default.limit"),
        (("prepare", "paper", "classes"), 500, "prepare.paper.classes"),
        (("prompts", "default", "template"), "A face of {age}", "prompts.default.template"),
        (("prompts", "default", "races"), ["White", "White"], "prompts.default.races"),
        (("models", "default", "dtype"), "float8", "models.default.dtype"),
        (("finetune", "default", "lr"), "fast", "finetune.default.lr"),
        (("finetune", "default", "exp_decode"), "quarter", "finetune.default.exp_decode"),
        (("finetune", "paper", "exp_crop"), 0.0, "finetune.paper.exp_crop"),
        (("memorization", "default", "identity"), "facenet", "memorization.default.identity"),
        (("prompts", "default", "negative"), None, "prompts.default.negative"),
        (("world", "default", "base_steps"), 0, "world.default.base_steps"),
        (("ablation", "paper", "alpha"), -1, "ablation.paper.alpha"),
        (("memorization", "default", "stranger_rate"), 2, "memorization.default.stranger_rate"),
        (("memorization", "paper", "stranger_rate"), -0.01, "memorization.paper.stranger_rate"),
        (("memorization", "default", "stranger_rate"), "abc", "memorization.default.stranger_rate"),
    ],
)
def test_bad_value_names_its_key(path, value, key):
    raw = _raw()
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=rf"{key}\b"):
        config.validate(raw)


def test_unknown_and_missing_keys_are_named():
    raw = _raw()
    raw["finetune"]["default"]["learning_rate"] = 1e-4
    with pytest.raises(ParamsError, match=r"finetune\.default\.learning_rate"):
        config.validate(raw)
    raw = _raw()
    del raw["generate"]["paper"]["steps"]
    with pytest.raises(ParamsError, match=r"generate\.paper\.steps is missing"):
        config.validate(raw)
    raw = _raw()
    del raw["prepare"]["paper"]
    with pytest.raises(ParamsError, match=r"prepare\.paper"):
        config.validate(raw)


def test_numeric_strings_are_read_as_numbers():
    raw = _raw()
    raw["finetune"]["default"]["lr"] = "1e-6"  # how YAML 1.1 reads 1e-6 without a dot
    assert config.validate(raw)["finetune"]["default"]["lr"] == 1e-6


def test_stage_params_picks_the_profile(tmp_path):
    raw = _raw()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert config.stage_params("finetune", "paper", tmp_path / "params.yaml")["lr"] == 1e-6
    raw2 = copy.deepcopy(raw)
    raw2["profile"] = "paper"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw2))
    assert config.stage_params("generate", path=tmp_path / "params.yaml")["limit"] is None
    # the paper's weights are not on this machine: a stage that reads them stops, naming the key
    with pytest.raises(ParamsError, match=r"prepare\.paper\.watermark"):
        config.stage_params("prepare", path=tmp_path / "params.yaml")


def test_cli_fails_with_the_key(tmp_path):
    raw = _raw()
    raw["generate"]["default"]["guidance_scale"] = -3
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    run = subprocess.run(
        [sys.executable, "-m", "geneava.core.config", "--params", str(bad)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "generate.default.guidance_scale" in run.stderr


def test_project_root_found_from_a_subfolder(monkeypatch):
    monkeypatch.delenv("GENEAVA_ROOT", raising=False)
    assert config.project_root(ROOT / "notebooks") == ROOT
    monkeypatch.setenv("GENEAVA_ROOT", str(ROOT / "tests"))
    assert config.project_root() == ROOT / "tests"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("models", "sdxl", "models/world/no_such_sdxl"),
        ("models", "expression", "models/world/no_such_poster.safetensors"),
        ("detector", "detector", "models/world/no_such_retinaface.safetensors"),
        ("memorization", "identity", "models/world/no_such_identity.safetensors"),
        ("evaluate", "lpips", "models/alexnet.pth"),
    ],
)
def test_a_model_path_that_does_not_exist_fails_validation_with_its_key(tmp_path, section, key, value):
    raw = _raw()
    raw[section]["default"][key] = value
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=rf"{section}\.default\.{key} = .*no such file or folder"):
        config.stage_params(section, path=bad)
    run = subprocess.run(
        [sys.executable, "-m", "geneava.core.config", "--params", str(bad)], capture_output=True, text=True
    )
    assert run.returncode == 2 and f"{section}.default.{key}" in run.stderr


def test_one_detector_block_reaches_every_stage_that_finds_faces(tmp_path):
    """The `detector` section is the only place a detector is named: each reader's block carries it, a
    missing detector file stops any of them, and a detector key left in a stage's block is refused with
    where it belongs."""
    assert config.DETECTOR_READERS == ("prepare", "generate", "evaluate")
    for section, fields in config.SCHEMA.items():  # the detector's keys live in its section only
        assert section == "detector" or not set(schema.DETECTOR) & set(fields), section
    raw = _raw()
    raw["detector"]["default"]["detector"] = "dlib"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(raw))
    for stage in config.DETECTOR_READERS:
        assert config.stage_params(stage, path=good)["detector"] == "dlib"
    raw["detector"]["default"]["detector"] = "models/world/no_such_retinaface.safetensors"
    good.write_text(yaml.safe_dump(raw))
    for stage in config.DETECTOR_READERS:
        with pytest.raises(ParamsError, match=r"detector\.default\.detector = "):
            config.stage_params(stage, path=good)
    raw = _raw()
    raw["generate"]["default"]["detector"] = "dlib"
    good.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ParamsError, match="generate.default.detector .detector settings live in the `detector`"
    ):
        config.load_params(good)


def test_hub_ids_and_names_are_not_paths():
    raw = config.validate(_raw())
    raw["models"]["default"]["sdxl"] = "stabilityai/stable-diffusion-xl-base-1.0"
    raw["evaluate"]["default"]["clip"] = "openai/clip-vit-large-patch14"
    raw["detector"]["default"]["detector"] = "auto"
    raw["memorization"]["default"]["derive"] = "none"  # data/ (a make repro output) may not exist here
    raw["stylize"]["default"]["expression_pairs"] = None
    config.check_sources(raw, "default")  # no error: loaded by hub id or by name


def test_a_missing_pairs_file_says_how_data_is_made(tmp_path):
    raw = config.validate(_raw())
    raw["memorization"]["default"]["derive"] = "data/no_such_pairs.csv"
    with pytest.raises(ParamsError, match=r"memorization\.default\.derive = .*make repro"):
        config.check_sources(raw, "default", ("memorization",))


def test_an_empty_params_file_says_it_is_empty(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing here\n")
    with pytest.raises(ParamsError, match="params.yaml is empty"):
        config.load_params(tmp_path / "params.yaml")


def test_paths_mean_the_project_roots_wherever_the_process_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("GENEAVA_ROOT", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")  # where JupyterLab starts kernels
    assert config.path("models/world/poster.safetensors") == ROOT / "models/world/poster.safetensors"
    assert config.source("models/world/sdxl") == str(ROOT / "models/world/sdxl")
    assert config.source("tiny") == "tiny"
    assert config.path(tmp_path) == tmp_path  # absolute paths stay
    monkeypatch.chdir(tmp_path)  # outside the checkout: the checkout geneava is installed from
    assert config.project_root() == ROOT


def test_params_read_the_same_after_dvc_rewrites_them(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml with its YAML 1.2 dumper, which leaves `no` unquoted;
    the project reads YAML 1.2 as DVC does, so every value stays what it was (PyYAML, YAML 1.1, read
    finetune.default.mixed_precision as False and every stage refused the file)."""
    import shutil

    from dvc.utils.serialize import modify_yaml

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    with modify_yaml(copy) as data:
        data["generate"]["default"]["steps"] = 7  # what `dvc exp run -S generate.default.steps=7` does
    assert "mixed_precision: no\n" in copy.read_text()  # DVC's dump: unquoted
    before, after = config.load_params(ROOT / "params.yaml"), config.load_params(copy)
    assert after["generate"]["default"]["steps"] == 7
    after["generate"]["default"]["steps"] = before["generate"]["default"]["steps"]
    assert after == before


def test_params_yaml_means_the_same_in_yaml_1_1_and_1_2():
    """Every value of params.yaml reads alike under YAML 1.1 (PyYAML: the tests' own copies of the file)
    and 1.2 (DVC, geneava): switching the project's reader changed no parameter."""
    assert config.read_yaml(ROOT / "params.yaml") == yaml.safe_load((ROOT / "params.yaml").read_text())


def test_notebook_overrides_take_precedence_and_none_means_params_yaml(tmp_path):
    """A notebook's `steps=4` wins over params.yaml for that run; None leaves params.yaml's value; the
    overridden file is validated like params.yaml and removed once nothing is overridden."""
    base = config.blocks("generate", profile="default")["generate"]
    path = config.with_overrides({"generate.steps": 4, "generate.limit": None}, "default", None, tmp_path)
    assert path == tmp_path / config.OVERRIDES_FILE and path.is_file()
    got = config.blocks("generate", profile="default", path=path)["generate"]
    assert got["steps"] == 4 and got["steps"] != base["steps"]
    assert {k: v for k, v in got.items() if k != "steps"} == {k: v for k, v in base.items() if k != "steps"}
    others = config.blocks("finetune", "prompts", profile="default", path=path)
    assert others == config.blocks("finetune", "prompts", profile="default")

    assert config.with_overrides({"generate.steps": None}, "default", None, tmp_path) is None
    assert not path.exists()  # a stale override file would mislead whoever reads the folder


def test_a_bad_or_unknown_override_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"generate\.default\.steps"):
        config.with_overrides({"generate.steps": -3}, "default", None, tmp_path)
    with pytest.raises(ParamsError, match=r"generate\.default\.stepz: no such parameter"):
        config.with_overrides({"generate.stepz": 3}, "default", None, tmp_path)
    assert not (tmp_path / config.OVERRIDES_FILE).exists()
