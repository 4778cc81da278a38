"""User-study kit: HITs with attention checks, pages answered in a real headless browser, and an
analysis that reproduces known approval rates."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geneava.stages import userstudy

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _pairs(tmp_path: Path, n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        left, right = tmp_path / f"face_{i}.png", tmp_path / f"avatar_{i}.png"
        Image.new("RGB", (8, 8), (i * 9 % 255, 80, 80)).save(left)
        Image.new("RGB", (8, 8), (80, i * 9 % 255, 80)).save(right)
        rows.append(
            {
                "left": str(left),
                "right": str(right),
                "expression": ["joy", "awe"][i % 2],
                "identity_group": ["female", "male"][i % 3 == 0],
                "row_id": f"r{i}",
            }
        )
    return pd.DataFrame(rows)


def test_hits_hold_fourteen_pairs_and_one_check_of_different_people(tmp_path):
    pairs = _pairs(tmp_path, 30)
    items = userstudy.build_hits(pairs, per_hit=15, seed=0)
    assert items.groupby("hit")["is_check"].sum().eq(1).all()
    assert items.groupby("hit").size().tolist() == [15, 15, 3]
    assert sorted(items.loc[~items["is_check"], "row_id"]) == sorted(pairs["row_id"])  # every pair once
    group = dict(zip(pairs["left"], pairs["identity_group"], strict=True)) | dict(
        zip(pairs["right"], pairs["identity_group"], strict=True)
    )
    for c in items[items["is_check"]].itertuples():  # the check's two images come from different groups
        assert group[c.left] != group[c.right]


def _results(items: pd.DataFrame, rate: dict[str, float], assignments: int, fail_checks: int, seed: int = 0):
    """Synthetic AMT results: answers "yes" with the given rate; `fail_checks` assignments say "yes" on
    the attention check (and "yes" everywhere)."""
    rng = np.random.default_rng(seed)
    rows = []
    for a in range(assignments):
        hit = a % items["hit"].nunique()
        row = {"Input.hit_id": hit, "WorkerId": f"w{a}"}
        for it in items[items["hit"] == hit].itertuples():
            for q, p in rate.items():
                if a < fail_checks:
                    ans = "yes"
                elif it.is_check:
                    ans = "no"
                else:
                    ans = "yes" if rng.random() < p else "no"
                row[f"Answer.q{it.q}_{q}"] = ans
        rows.append(row)
    return pd.DataFrame(rows)


def test_analysis_reproduces_a_known_approval_rate_and_drops_failed_checks(tmp_path):
    items = userstudy.build_hits(_pairs(tmp_path, 140), per_hit=15, seed=1)
    results = _results(items, {"identity": 0.93, "expression": 0.96}, assignments=900, fail_checks=40)
    out = userstudy.analyse("stylization", results, items)
    assert out["discarded"] == 40 and out["assignments"] == 900
    for q, p in (("identity", 0.93), ("expression", 0.96)):
        s = out["questions"][q]
        assert s["lo"] <= p <= s["hi"] and abs(s["rate"] - p) < 0.01, s
    assert {r["expression"] for r in out["per_class"]} == {"joy", "awe"}
    # had the careless workers passed the check, their all-"yes" answers would have raised the rate
    careless = results.copy()
    for a in range(40):
        hit = careless.loc[a, "Input.hit_id"]
        check = items[(items["hit"] == hit) & items["is_check"]]["q"].item()
        careless.loc[a, f"Answer.q{check}_identity"] = "no"
    biased = userstudy.analyse("stylization", careless, items)
    assert (
        biased["discarded"] == 0
        and biased["questions"]["identity"]["rate"] > out["questions"]["identity"]["rate"]
    )
    with pytest.raises(ValueError, match="no answer"):
        userstudy.analyse("stylization", results.drop(columns=["Answer.q1_identity"]), items)


def test_wilson_interval_matches_its_formula():
    lo, hi = userstudy.wilson(93, 100)
    assert lo == pytest.approx(0.8625, abs=1e-3) and hi == pytest.approx(0.9657, abs=1e-3)


def test_kit_files_and_amt_batch(tmp_path):
    items = userstudy.build_hits(_pairs(tmp_path, 20), per_hit=15, seed=0)
    kit = userstudy.write_kit(
        "stylization", items, tmp_path / "kit", image_base_url="https://example.org/img/"
    )
    assert kit == {"study": "stylization", "hits": 2, "items": 22, "checks": 2}
    batch = pd.read_csv(tmp_path / "kit" / "amt_batch.csv")
    assert len(batch) == 2 and batch.loc[0, "q1_left"].startswith("https://example.org/img/")
    template = (tmp_path / "kit" / "amt_template.html").read_text()
    assert "${q15_right}" in template and "${hit_id}" in template
    for h in (0, 1):
        page = (tmp_path / "kit" / f"hit_{h}.html").read_text()
        assert page.count('type="radio"') == 2 * 2 * len(items[items["hit"] == h])


@pytest.mark.parametrize("study", ["stylization", "memorization"])
def test_pages_work_in_a_headless_browser_and_round_trip_into_the_analysis(tmp_path, study):
    if not (CHROMIUM and CHROMEDRIVER):
        # under CI (.ci/run installs the browser) a missing browser is a failure, not a quiet skip
        if os.environ.get("CI"):
            pytest.fail("CI: chromium and chromedriver are missing; .ci/run should have installed them")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    items = userstudy.build_hits(_pairs(tmp_path, 10), per_hit=15, seed=2)
    userstudy.write_kit(study, items, tmp_path / "kit")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get((tmp_path / "kit" / "hit_0.html").as_uri())
        assert all(img.get_property("naturalWidth") == 8 for img in driver.find_elements(By.TAG_NAME, "img"))
        # an incomplete page refuses to submit (the browser's own validation of required answers)
        driver.find_element(By.ID, "submit").click()
        assert driver.find_element(By.ID, "results").get_property("value") == ""
        assert not driver.execute_script('return document.getElementById("hit").checkValidity()')
        # answer like an attentive worker: "no" on the check, then yes/no alternating
        expected = {}
        for it in items[items["hit"] == 0].itertuples():
            for j, q in enumerate(userstudy.QUESTIONS[study]):
                ans = "no" if (it.is_check or (it.q + j) % 3 == 0) else "yes"
                driver.find_element(By.CSS_SELECTOR, f'input[name="q{it.q}_{q}"][value="{ans}"]').click()
                expected[(it.q, q)] = ans
        driver.find_element(By.ID, "submit").click()
        text = driver.find_element(By.ID, "results").get_property("value")
    finally:
        driver.quit()
    (tmp_path / "answers.csv").write_text(text)
    results = pd.read_csv(tmp_path / "answers.csv")
    assert len(results) == 1
    for (k, q), ans in expected.items():
        assert results.loc[0, f"Answer.q{k}_{q}"] == ans
    out = userstudy.analyse(study, results, items)
    assert out["discarded"] == 0
    for q in userstudy.QUESTIONS[study]:
        real = [
            a
            for (k, qq), a in expected.items()
            if qq == q and not items.set_index(["hit", "q"]).loc[(0, k), "is_check"]
        ]
        assert out["questions"][q]["rate"] == pytest.approx(real.count("yes") / len(real))


def test_study_pairs_come_from_the_stage_outputs(tmp_path, default):
    from tests.test_release import _world

    out = _world(tmp_path, memorized=[], failed_stylization=[])
    params = dict(default["userstudy"], per_class=1)
    pairs = userstudy.study_pairs("stylization", params, out)
    assert len(pairs) == 2 and sorted(pairs["expression"]) == ["awe", "joy"]  # one per class
    assert all(Path(p).is_file() for p in [*pairs["left"], *pairs["right"]])
    assert set(pairs["identity_group"]) <= {"female", "male"}
    match = tmp_path / "outputs" / "prepare" / "data" / "images" / "finetune" / "x" / "0.png"
    match.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(match)
    review = pd.DataFrame(
        {
            "reference_set": ["finetune"],
            "generated": ["images/x/0.png"],
            "match": ["images/finetune/x/0.png"],
            "match_path": [str(match.relative_to(tmp_path))],
            "similarity": [0.5],
            "same_person": [""],
        }
    )
    review.to_csv(out / "memorization" / "review.csv", index=False)
    memo = userstudy.study_pairs("memorization", params, out)
    assert memo["right"].tolist() == [str(match)] and Path(memo["left"][0]).is_file()
