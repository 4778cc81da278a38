"""The identity audit must be able to fail: planted copies of fine-tuning faces are found, other
people are not, and the search and the threshold finder equal their brute-force definitions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from geneava.core.io import save_png, sha256_file, write_csv
from geneava.networks import identity
from geneava.stages import memorization, refill
from geneava.world import dataset
from tests.conftest import write_generated

# ------------------------------------------------------------------ search and thresholds


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_blocked_nearest_neighbour_equals_the_full_search(metric):
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(37, 16, generator=g), torch.randn(53, 16, generator=g)
    best, arg = identity.nearest(q, r, metric, block=8)
    if metric == "cosine":
        full = (
            torch.nn.functional.normalize(q.double(), dim=1)
            @ torch.nn.functional.normalize(r.double(), dim=1).T
        )
        want, want_arg = full.max(1)
    else:
        want, want_arg = torch.cdist(q.double(), r.double()).min(1)
    assert torch.allclose(best, want, atol=1e-10) and torch.equal(arg, want_arg)


@pytest.mark.parametrize("block", [1, 8, 64])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_excluding_self_finds_each_members_nearest_other(metric, block):
    """The reference set searched against itself, whole blocks of self (1), the diagonal across several
    blocks and a ragged last one (8), one block (64): never a member as its own neighbour, and otherwise
    the full search's answer. Masking is by index: a member's exact copy is still its nearest other."""
    r = torch.randn(37, 16, generator=torch.Generator().manual_seed(1))
    r[20] = r[5]
    best, arg = identity.nearest(r, r, metric, block=block, exclude_self=True)
    if metric == "cosine":
        n = torch.nn.functional.normalize(r.double(), dim=1)
        want, want_arg = (n @ n.T).fill_diagonal_(-np.inf).max(1)
    else:
        want, want_arg = torch.cdist(r.double(), r.double()).fill_diagonal_(np.inf).min(1)
    assert torch.allclose(best, want, atol=1e-10) and torch.equal(arg, want_arg)
    assert (arg != torch.arange(37)).all() and arg[5] == 20 and arg[20] == 5
    assert best[5].item() == pytest.approx(1.0 if metric == "cosine" else 0.0, abs=1e-7)
    with pytest.raises(ValueError, match="reference set itself"):
        identity.nearest(r[:5], r, metric, exclude_self=True)
    with pytest.raises(ValueError, match="one reference, no other"):
        identity.nearest(r[:1], r[:1], metric, exclude_self=True)


def _strangers(n: int, spread: float, seed: int = 0) -> dict:
    """n reference people: embeddings around one direction (small spread: look-alikes)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.ones(n, 32) + spread * torch.randn(n, 32, generator=g)
    return {"embedding": e, "face_found": torch.ones(n, dtype=torch.bool)}


def _labelled(default, **kw) -> dict:
    """Memorization parameters with a labelled CelebA-style reference (one image per person)."""
    return dict(default["memorization"], reference="celeba", reference_identities="ids.txt", **kw)


def test_the_derived_threshold_rises_to_the_searchs_scale(default):
    """Look-alike strangers: the pairs' threshold calls all of them the same as another; at_scale raises
    it to the lowest value at which at most stranger_rate do, reports the share at the pairs' threshold,
    and judges the labelled pairs again at the new value."""
    ref = _strangers(200, 0.1)
    nn = identity.nearest(ref["embedding"], ref["embedding"], exclude_self=True)[0].numpy()
    same = np.array([True, True, True, False])
    scores = (np.array([nn.max() + 1e-4, nn.min(), 0.7, 0.2]), same)  # one same pair above every stranger
    d = memorization.at_scale(
        {"threshold": 0.5, "gain_ratio": 1.0, "accuracy": 1.0},
        ref,
        _labelled(default, stranger_rate=0.05),
        scores,
    )
    assert d["pairs_threshold"] == 0.5 and d["strangers"] == 200 and d["gain_ratio"] == 1.0
    assert d["strangers_same_at_pairs_threshold"] == 1.0  # every look-alike is "the same" at 0.5
    # at most 5% of 200 strangers at or above it, and it is the lowest such threshold (nearest-other
    # similarities come in tied pairs: A's nearest is B and B's is A, so the count can stop at 9)
    t = d["threshold"]
    assert (nn >= t).sum() <= 10 < (nn >= np.nextafter(t, -np.inf)).sum()
    # the pairs at the raised value: one of three same pairs above it, the different one below
    assert d["same_pairs_called_same"] == pytest.approx(1 / 3) and d["accuracy"] == 0.5
    assert d["pairs_accuracy"] == 1.0
    rule = memorization._derived_rule(d)["derived"]
    assert "calls 100.0% of the reference's 200 people the same" in rule and "at most 5%" in rule
    assert "33% of the labelled same pairs reach it" in rule
    # 0.29 x 100 is 28.999999999999996 in floats: 29 people may match, not 28
    for seed in range(50):  # a set where the 29th and 30th closest differ (mutual nearest pairs tie)
        hundred = _strangers(100, 0.1, seed=seed)
        found = identity.nearest(hundred["embedding"], hundred["embedding"], exclude_self=True)[0]
        nn100 = np.sort(found.numpy())
        if nn100[::-1][28] != nn100[::-1][29]:
            break
    else:
        pytest.fail("no seed gives distinct 29th and 30th nearest-other similarities")
    t29 = memorization.at_scale({"threshold": 0.5}, hundred, _labelled(default, stranger_rate=0.29))[
        "threshold"
    ]
    assert t29 == np.nextafter(nn100[::-1][29], 2)
    # a rate below one person in 200: above every stranger's nearest other
    none = memorization.at_scale({"threshold": 0.5}, ref, _labelled(default, stranger_rate=0.001))
    assert none["threshold"] == np.nextafter(nn.max(), 2) and (nn >= none["threshold"]).sum() == 0
    zero = memorization.at_scale({"threshold": 0.5}, ref, _labelled(default, stranger_rate=0.0))
    assert zero["threshold"] == none["threshold"]  # 0: no reference person may match another
    # a rate of 1: everyone may match, the pairs' threshold stands
    assert (
        memorization.at_scale({"threshold": 0.5}, ref, _labelled(default, stranger_rate=1.0))["threshold"]
        == 0.5
    )
    # strangers far apart: the pairs' threshold stands, with the share it calls the same reported
    far = memorization.at_scale(
        {"threshold": 0.9}, _strangers(200, 10.0), _labelled(default, stranger_rate=0.05)
    )
    assert far["threshold"] == 0.9 and far["strangers_same_at_pairs_threshold"] == 0.0
    assert (
        "(C4.5 split; at it 0.0% of the reference's 200 people match another"
        in memorization._derived_rule(far)["derived"]
    )


def test_only_a_labelled_one_per_person_reference_moves_the_derived_rule(default):
    ref, d = _strangers(50, 0.1), {"threshold": 0.5}
    assert memorization.at_scale(d, ref, _labelled(default, stranger_rate=0.01))["threshold"] > 0.5
    for off in (dict(reference_identities=None), dict(stranger_rate=None), dict(reference=None)):
        # no identity file, the check off, or the stand-in's split (several images per person)
        assert memorization.at_scale(d, ref, {**_labelled(default, stranger_rate=0.01), **off}) == d
    failed = {"threshold": None, "error": "x"}
    assert memorization.at_scale(failed, ref, _labelled(default)) == failed
    assert memorization.at_scale(None, ref, _labelled(default)) is None
    one = {**ref, "face_found": torch.zeros(50, dtype=torch.bool)}
    one["face_found"][0] = True
    assert memorization.at_scale(d, one, _labelled(default)) == d  # one person found: no stranger to meet
    # people whose face was not found are no one's strangers: with the look-alikes unfound, the two
    # found people are far apart and the pairs' threshold stands
    mixed = {"embedding": ref["embedding"].clone(), "face_found": torch.zeros(50, dtype=torch.bool)}
    mixed["embedding"][:2] = torch.tensor([[1.0] + [0.0] * 31, [0.0, 1.0] + [0.0] * 30])
    mixed["face_found"][:2] = True
    kept = memorization.at_scale(d, mixed, _labelled(default, stranger_rate=0.01))
    assert kept["strangers"] == 2 and kept["threshold"] == 0.5
    assert (
        memorization.at_scale(d, {**mixed, "face_found": ~mixed["face_found"]}, _labelled(default))[
            "threshold"
        ]
        > 0.5
    )  # the same set with the look-alikes found


def test_a_reference_of_copies_stops_the_audit_with_what_to_do(default):
    ref = _strangers(50, 0.1)
    ref["embedding"][10:20] = ref["embedding"][0]  # 11 copies of one person: more than 1% of 50
    with pytest.raises(ValueError, match="identical other .* remove the copies, or raise stranger_rate"):
        memorization.at_scale({"threshold": 0.5}, ref, _labelled(default, stranger_rate=0.01))
    nn = identity.nearest(ref["embedding"], ref["embedding"], exclude_self=True)[0].numpy()
    assert (nn >= 1 - 1e-9).sum() == 11
    with pytest.raises(ValueError, match="11 of the reference's 50 people"):  # 10 allowed at 20%
        memorization.at_scale({"threshold": 0.5}, ref, _labelled(default, stranger_rate=0.2))
    # 22% of 50 is 11 exactly: the copies are the ones allowed to match, and stay above the threshold
    t = memorization.at_scale({"threshold": 0.5}, ref, _labelled(default, stranger_rate=0.22))["threshold"]
    assert 0.5 < t == np.nextafter(np.sort(nn)[::-1][11], 2) and (nn >= t).sum() == 11


def _gain_ratio_brute(s, y, t):
    def h(v):
        p = v.mean() if len(v) else 0
        return 0.0 if p in (0, 1) else -(p * np.log2(p) + (1 - p) * np.log2(1 - p))

    left = s >= t
    split = h(left.astype(float))
    gain = (
        h(y.astype(float))
        - left.mean() * h(y[left].astype(float))
        - (1 - left.mean()) * h(y[~left].astype(float))
    )
    return gain / split if split else -np.inf


def test_the_threshold_finder_recovers_a_known_split():
    rng = np.random.default_rng(0)
    same = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    scores = np.r_[rng.uniform(0.55, 1.0, 60), rng.uniform(-0.2, 0.45, 140)]
    t, ratio = identity.gain_ratio_threshold(scores, same)
    assert 0.45 < t <= scores[same].min() and ratio == pytest.approx(1.0)
    # overlapping classes: the choice is the brute-force best over every observed score
    scores = np.r_[rng.normal(0.6, 0.15, 60), rng.normal(0.3, 0.15, 140)]
    t, ratio = identity.gain_ratio_threshold(scores, same)
    brute = max(scores[scores > scores.min()], key=lambda c: _gain_ratio_brute(scores, same, c))
    assert t == pytest.approx(brute) and ratio == pytest.approx(_gain_ratio_brute(scores, same, brute))
    # a distance: smaller is "same"
    t_d, _ = identity.gain_ratio_threshold(1 - scores, same, higher_is_same=False)
    assert t_d == pytest.approx(1 - t)
    with pytest.raises(ValueError, match="both kinds"):
        identity.gain_ratio_threshold(scores, np.ones(200, bool))
    # an inverted relation (different pairs score higher) has a high gain but is no threshold
    with pytest.raises(ValueError, match="right direction"):
        identity.gain_ratio_threshold(
            np.r_[np.zeros(5), np.ones(5)], np.r_[np.ones(5, bool), np.zeros(5, bool)]
        )


def test_both_readings_of_the_paper_threshold():
    sim = torch.tensor([0.2, 0.32, 0.5, 0.68, 0.9])
    v = identity.verdicts(sim, 0.68)
    assert v["paper"].tolist() == [False, False, False, False, True]
    assert v["deepface"].tolist() == [False, True, True, True, True]


# ------------------------------------------------------------------ the audit on real photos


def _jpeg(img: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _write_world(tmp: Path, finetune: list[Image.Image], generated: list[Image.Image]) -> tuple[Path, Path]:
    prep = tmp / "prepare"
    rows = []
    for i, img in enumerate(finetune):
        file = f"images/finetune/person/{i}.png"
        save_png(prep / "data" / file, img)
        rows.append(
            {
                "file": file,
                "split": "finetune",
                "expression": "x",
                "sha256": sha256_file(prep / "data" / file),
            }
        )
    write_csv(prep / "data" / "manifest.csv", pd.DataFrame(rows))
    gen = write_generated(tmp / "generate", generated)
    return prep, gen


@pytest.fixture(scope="module")
def planted(tmp_path_factory, people, default):
    """Fine-tuning set: people 0-2. Reference set: a JPEG of the last person. Generated: an exact copy of
    person 0, a flipped, cropped, JPEG'd copy of person 1, and everyone from person 3 on."""
    tmp = tmp_path_factory.mktemp("memo")
    w = people[1].width
    augmented = _jpeg(ImageOps.mirror(people[1]).crop((6, 6, w - 6, w - 6)).resize((w, w)))
    generated = [people[0].copy(), augmented, *people[3:]]
    prep, gen = _write_world(tmp, people[:3], generated)
    (tmp / "celeb").mkdir()
    _jpeg(people[-1], 80).save(tmp / "celeb" / "000001.jpg")
    params = dict(
        default["memorization"],
        identity="dlib",
        derive="none",
        removal_rule="auto",  # dlib: its own rule
        include="kept",
        review_pairs=3,
        reference="celeb",
    )
    out = memorization.audit(params, prep, gen, tmp / "out", tmp, model=identity.DlibIdentity())
    return out, len(generated), tmp / "out"


def test_planted_copies_are_flagged_and_other_people_are_not(planted):
    out, n, _ = planted
    nn = out["nearest"].set_index("row_id")
    assert nn.loc["x|0", "finetune_distance"] < 1e-6
    assert nn.loc[["x|0", "x|1"], "finetune_same_model"].all()  # the exact and the augmented copy
    others = [f"x|{i}" for i in range(2, n)]
    assert not nn.loc[others, "finetune_same_model"].any(), nn.loc[others, "finetune_distance"]
    last = f"x|{n - 1}"  # the reference person, generated again
    assert nn.loc[last, "reference_same_model"] and nn["reference_same_model"].sum() == 1
    assert out["metrics"]["finetune"]["same_model"] == 2 and out["metrics"]["reference"]["same_model"] == 1
    assert sorted(out["removal"]["row_id"]) == sorted(["x|0", "x|1", last])
    assert out["report"]["faces_not_found"]["generated"] == 0
    # 2 of n generated faces copy a fine-tuning person, 1 is the reference person: excess 1/n
    ex = out["metrics"]["excess_over_reference"]
    assert ex["rule"] == "model" and ex["finetune"] == pytest.approx(2 / n)
    assert ex["difference"]["mean"] == pytest.approx(1 / n)
    assert ex["difference"]["lo"] <= ex["difference"]["mean"] <= ex["difference"]["hi"]


def test_excess_over_reference_separates_copies_from_look_alikes():
    n = 200
    look_alikes = pd.DataFrame(
        {"finetune_same_x": np.arange(n) % 10 == 0, "reference_same_x": np.arange(n) % 10 == 5}
    )
    ex = memorization.excess_over_reference(look_alikes, "x", seed=0)
    assert ex["difference"]["mean"] == 0 and ex["difference"]["lo"] < 0 < ex["difference"]["hi"]
    copies = look_alikes.assign(finetune_same_x=np.arange(n) % 3 == 0)  # a third copy a tuned person
    ex = memorization.excess_over_reference(copies, "x", seed=0)
    assert ex["difference"]["lo"] > 0.1


def test_the_audit_writes_its_review_sheet_and_removal_list(planted):
    out, _, folder = planted
    review = pd.read_csv(folder / "review.csv", keep_default_na=False)
    assert len(review) == 6 and set(review["reference_set"]) == {"finetune", "reference"}
    assert review["same_person"].eq("").all()  # for people to fill
    assert review.iloc[0]["generated"] == "images/x/0.png"
    removal = pd.read_csv(folder / "removal.csv")
    assert set(removal["rule"]) == {"model"} and len(removal) == 3
    assert "same (model)" in (folder / "summary.md").read_text()


def test_a_reference_identity_file_picks_one_image_per_identity(tmp_path, default):
    folder = tmp_path / "celeba"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:06d}.jpg")
    (tmp_path / "ids.txt").write_text(
        "000000.jpg 7\n000001.jpg 7\n000002.jpg 9\n000003.jpg 9\n000004.jpg 5\nmissing.jpg 4\n"
    )
    params = dict(default["memorization"], reference="celeba", reference_identities="ids.txt")
    rows, what = memorization.reference_set(params, tmp_path, tmp_path)
    assert len(rows) == 3 and "3 identities" in what
    with pytest.raises(FileNotFoundError, match="reference"):
        memorization.reference_set(dict(params, reference="nowhere"), tmp_path, tmp_path)


class _ColourIdentity:
    """An identity model whose 'person' is an image's mean colour (centred): look-alikes are near colours."""

    name, own_rule = "colour", None

    def embed(self, rgb):
        return (rgb.reshape(-1, 3).mean(0) - 128) / 128, True


def test_the_audit_removes_by_the_threshold_raised_to_its_references_scale(tmp_path, default):
    """Twenty look-alike reference people (colours 3 apart) and a same pair 10 apart: the pairs' threshold
    (0.9947) calls every reference person the same as another (nearest others 0.99955-0.99967), so the
    audit raises it; then a copy of a reference person is still removed, a look-alike (0.99931) that the
    pairs' threshold would remove no longer is, and refill reads the raised value."""
    swatch = lambda c: Image.new("RGB", (16, 16), c)  # noqa: E731
    (tmp_path / "celeba").mkdir()
    ref = [(200, 100 + 3 * i, 50 + (i % 5)) for i in range(20)]
    for i, c in enumerate(ref):
        swatch(c).save(tmp_path / "celeba" / f"{i:06d}.png")
    (tmp_path / "ids.txt").write_text("".join(f"{i:06d}.png {i}\n" for i in range(20)))
    (tmp_path / "pairs").mkdir()
    rows = []
    for i, (a, b, same) in enumerate(
        [((200, 100, 50), (200, 110, 60), 1), ((200, 100, 50), (40, 100, 220), 0)] * 3
    ):
        swatch(a).save(tmp_path / "pairs" / f"{i}a.png")
        swatch(b).save(tmp_path / "pairs" / f"{i}b.png")
        rows.append(f"{i}a.png,{i}b.png,{same}")
    (tmp_path / "pairs" / "pairs.csv").write_text("path_a,path_b,same\n" + "\n".join(rows) + "\n")
    copy, look_alike, far = ref[7], (200, 115, 58), (30, 200, 90)
    prep, gen = _write_world(
        tmp_path, [swatch((90, 90, 90))], [swatch(copy), swatch(look_alike), swatch(far)]
    )
    params = _labelled(
        default, derive="pairs/pairs.csv", removal_rule="derived", stranger_rate=0.05, review_pairs=2
    )
    out_dir = tmp_path / "outputs" / "memorization"
    out = memorization.audit(params, prep, gen, out_dir, tmp_path, model=_ColourIdentity())
    d = out["metrics"]["derived"]
    assert d["strangers"] == 20 and d["strangers_same_at_pairs_threshold"] == 1.0
    # one of 20 may match: people 0 and 1 are each other's nearest (0.9996667), so neither does
    assert d["pairs_threshold"] == pytest.approx(0.99472, abs=1e-5)
    assert d["threshold"] == pytest.approx(0.9996667, abs=1e-6)
    assert d["same_pairs_called_same"] == 0.0  # the labelled same pairs are farther apart than strangers
    assert d["accuracy"] == 0.5 and d["pairs_accuracy"] == 1.0  # the 3 same pairs now called different
    assert "0% of the labelled same pairs reach it" in out["report"]["rules"]["derived"]
    nn = out["nearest"].set_index("row_id")
    assert d["pairs_threshold"] <= nn.loc["x|1", "reference_similarity"] < d["threshold"]
    assert sorted(pd.read_csv(out_dir / "removal.csv")["row_id"]) == ["x|0"]  # the copy only
    assert "raised until at most 5% do" in out["report"]["rules"]["derived"]
    assert refill.memorization_rule(tmp_path / "outputs", params, None) == ("derived", d["threshold"])


def test_labelled_pairs_from_a_csv_are_checked(tmp_path, default):
    (tmp_path / "pairs.csv").write_text("path_a,path_b\na.png,b.png\n")
    with pytest.raises(ValueError, match="same"):
        memorization.labelled_pairs(
            dict(default["memorization"], derive="pairs.csv"), tmp_path, tmp_path / "out"
        )
    (tmp_path / "pairs.csv").write_text("path_a,path_b,same\na.png,b.png,1\nc.png,d.png,false\n")
    pairs = memorization.labelled_pairs(
        dict(default["memorization"], derive="pairs.csv"), tmp_path, tmp_path / "out"
    )
    assert pairs["same"].tolist() == [True, False] and pairs["path_a"][0] == str(tmp_path / "a.png")


def test_standin_pairs_give_a_derived_threshold(tmp_path, default):
    csv = dataset.write_pairs(tmp_path, identity=12, expression=1) / "identity.csv"
    params = dict(default["memorization"], derive=str(csv))
    pairs = memorization.labelled_pairs(params, tmp_path, tmp_path)
    assert len(pairs) == 12 and pairs["same"].sum() == 6
    d = identity.derive_threshold(identity.DlibIdentity(), pairs, tmp_path / "cache")
    assert d["pairs"] == 12 and d["same_pairs"] == 6
    # dlib (a real-photo model) tells the stand-in's drawn people apart only weakly, but it does: same
    # pairs score higher on average, and the split beats chance on these pairs
    assert d["mean_similarity_same"] > d["mean_similarity_different"]
    assert d["mean_similarity_different"] < d["threshold"] <= 1 and d["accuracy"] > 0.5


def test_a_failed_derivation_is_reported_not_a_crash(planted, default):
    """Deriving the threshold can fail (here: only same-person pairs); with another removal rule the
    audit goes on and its report says why there is no derived rule."""
    _, _, folder = planted
    tmp = folder.parent
    pd.DataFrame(
        {
            "path_a": ["generate/finetuned/images/x/0.png"],
            "path_b": ["generate/finetuned/images/x/1.png"],
            "same": [True],
        }
    ).to_csv(tmp / "same_only.csv", index=False)
    params = dict(
        default["memorization"],
        identity="dlib",
        derive="same_only.csv",
        removal_rule="paper",
        include="kept",
        review_pairs=3,
        reference="celeb",
    )
    out = memorization.audit(
        params, tmp / "prepare", tmp / "generate", tmp / "out2", tmp, model=identity.DlibIdentity()
    )
    assert out["metrics"]["derived"]["threshold"] is None
    assert out["report"]["rules"]["derived"].startswith("not available: need labelled pairs of both kinds")
    # the audit went on under the paper's rule: its removal list is exactly the faces above 0.68
    removal = pd.read_csv(tmp / "out2" / "removal.csv")
    nn = out["nearest"]
    above = {r for s in ("finetune", "reference") for r in nn.loc[nn[f"{s}_similarity"] > 0.68, "row_id"]}
    assert set(removal["row_id"]) == above and set(removal["rule"]) <= {"paper"}
    assert out["metrics"]["removed_images"] == len(above)
