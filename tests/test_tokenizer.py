import pytest
from transformers import CLIPTokenizer

from geneava.core import emo135, prompts
from geneava.networks.tokenizer import train_clip_tokenizer


@pytest.fixture(scope="module")
def tok(params):
    return train_clip_tokenizer(prompts.vocabulary(params["prompts"]["default"]))


def test_prompt_words_are_single_tokens(tok, params):
    table = prompts.prompt_table(params["prompts"]["paper"])
    longest = max(table["prompt"], key=len)
    ids = tok(longest).input_ids
    assert len(ids) <= tok.model_max_length
    for name in emo135.names():
        assert len(tok(name, add_special_tokens=False).input_ids) == 1, name


def test_any_text_encodes_without_unknowns(tok):
    ids = tok("Zebra größe 42 ✓", add_special_tokens=False).input_ids
    # byte-level BPE: every character has a token, so neither <|endoftext|> (unk and eos alike in
    # transformers 5) nor anything else stands in for a character
    assert ids and tok.unk_token_id not in ids
    # CLIP's normalisation lower-cases and splits digits; nothing else is lost
    assert tok.decode(ids) == "zebra größe 4 2 ✓"


def test_deterministic_and_round_trips(tok, params, tmp_path):
    again = train_clip_tokenizer(prompts.vocabulary(params["prompts"]["default"]))
    assert again.get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "A photorealistic face of an elderly Latino man, displaying exasperation."
    assert loaded(text).input_ids == tok(text).input_ids


def test_learned_merges_are_stable_and_complete():
    from geneava.networks.tokenizer import learn_merges

    words = [("f", "a", "c", "e</w>"), ("f", "a", "c", "t</w>"), ("a", "c", "e</w>")]
    merges = learn_merges(words)
    assert merges == learn_merges(list(reversed(words)))
    assert merges[0] == ("a", "c")  # most frequent pair first
    # every word ends as a single symbol
    assert {"face</w>", "fact</w>", "ace</w>"} <= {a + b for a, b in merges}


def test_same_tokenizer_in_every_process():
    """finetune and generate run in separate kernels: the ids must not depend on hash seeds."""
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, json; from geneava.core import config, prompts;"
        "from geneava.networks import tokenizer;"
        "p = config.load_params('params.yaml')['prompts']['default'];"
        "t = tokenizer.train_clip_tokenizer(prompts.vocabulary(p));"
        "print(hashlib.sha256(json.dumps(t.get_vocab(), sort_keys=True).encode()).hexdigest())"
    )
    from .conftest import ROOT

    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONHASHSEED=seed),
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1
