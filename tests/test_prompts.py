from geneava.core import emo135, prompts


def test_class_list():
    names = emo135.names()
    assert len(names) == 135 == len(set(names))
    assert {c.primary for c in emo135.classes()} == set(emo135.PRIMARY)


def test_reconcile_reports_differences():
    report = emo135.reconcile(emo135.names()[1:] + ["smugness"])
    assert report == {"missing_from_data": [emo135.names()[0]], "unknown_to_list": ["smugness"]}


def test_table_is_balanced_98_per_expression(params):
    table = prompts.prompt_table(params["prompts"]["paper"])
    assert len(table) == 13_230
    assert (table.groupby("expression").size() == 98).all()
    for column, groups in (("race", 7), ("gender", 2), ("age", 7)):
        counts = table.groupby(["expression", column]).size()
        assert (counts == 98 // groups).all()
    assert table["row_id"].is_unique
    assert table["seed"].nunique() == len(table)


def test_sample_prompt_matches_the_paper(params):
    table = prompts.prompt_table(params["prompts"]["paper"], expressions=["delight"])
    row = table[(table.race == "Indian") & (table.gender == "female") & (table.age == "middle-aged")]
    assert row["prompt"].item() == (
        "A photorealistic face of a middle-aged Indian woman with shoulders visible, "
        "displaying a facial expression of delight, plain white background."
    )
    assert table[table.age == "elderly"]["prompt"].str.contains("of an elderly").all()


def test_seeds_depend_on_the_row_not_the_order(params):
    p = params["prompts"]["default"]
    full = prompts.prompt_table(p).set_index("row_id")["seed"]
    part = prompts.prompt_table(p, expressions=["rage", "delight"]).set_index("row_id")["seed"]
    assert (full.loc[part.index] == part).all()
    assert (prompts.prompt_table(p, seed=1).set_index("row_id")["seed"] != full).all()


def test_vocabulary_covers_prompt_words(params):
    vocab = set(prompts.vocabulary(params["prompts"]["default"]))
    assert {"photorealistic", "shoulders", "an", "Southeast", "middle-aged"} <= vocab
    assert set(emo135.names()) <= vocab
