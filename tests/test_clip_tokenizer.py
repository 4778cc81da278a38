"""OpenAI CLIP's tokenizer built offline from the fetched BPE file, the paper's prompt lengths under it, and
SDXL's fallback to it. The BPE file is fetched by setup: without it these tests fail, they do not skip."""

import gzip
import logging
import re
import shutil

import pytest

from geneava.core import emo135, prompts
from geneava.networks import models, pretrained
from geneava.networks.tokenizer import CLIP_BPE
from geneava.tools import prompt_lengths

from .conftest import ROOT

# Ids OpenAI's tokenizer gives (transformers' openai/clip-vit-base-patch32 tokenizer and open_clip's
# SimpleTokenizer agree; the values are the ones published with other CLIP ports' tests), not computed here.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "A Photo of a TREE!": [49406, 320, 1125, 539, 320, 2677, 256, 49407],  # lower-cased; "!</w>" = 256
    "Hello,   WORLD!": [49406, 3306, 267, 1002, 256, 49407],  # whitespace runs collapse
    "mobileclip": [49406, 9451, 944, 8546, 49407],  # not a word of the vocabulary: three pieces
    "hatbox": [49406, 3447, 2063, 49407],  # "hat" inside a word ...
    "hat box": [49406, 3801, 2063, 49407],  # ... is not "hat</w>"
    "birthday cake 2024": [49406, 1166, 2972, 273, 271, 273, 275, 49407],  # one token per digit
    "it's a cat's toy, running   fast": [49406, 585, 568, 320, 2368, 568, 5988, 267, 2761, 1953, 49407],
    "café": [49406, 15304, 49407],  # bytes beyond ASCII
    "🐶": [49406, 10631, 49407],
    "": [49406, 49407],
}


@pytest.fixture(scope="module")
def pair():
    return models.clip_tokenizers()


@pytest.fixture(scope="module")
def paper_texts(params):
    p = params["prompts"]["paper"]
    table = prompts.prompt_table(p)
    return {"prompts": list(table["prompt"]), "captions": [prompts.caption(p, e) for e in emo135.names()]}


def test_known_ids(pair):
    tok, tok2 = pair
    for text, ids in KNOWN_IDS.items():
        assert tok(text).input_ids == ids, text
        if "!" not in text:  # tokenizer_2's "!" is its (special) pad token: id 0, as in SDXL's own files
            assert tok2(text).input_ids == ids, text
    assert tok2("hello!").input_ids == [49406, 3306, 0, 49407]


def test_vocabulary_and_padding(pair):
    tok, tok2 = pair
    for t in pair:
        assert len(t) == 49408 and t.model_max_length == 77
        assert (t.bos_token_id, t.eos_token_id) == (49406, 49407)
        assert t.convert_ids_to_tokens([0, 256]) == ["!", "!</w>"]
    assert tok.get_vocab() == tok2.get_vocab()
    assert (tok.pad_token, tok.pad_token_id, tok2.pad_token, tok2.pad_token_id) == (
        "<|endoftext|>",
        49407,
        "!",
        0,
    )
    one = tok("a cat", padding="max_length", max_length=77).input_ids
    two = tok2("a cat", padding="max_length", max_length=77).input_ids
    assert one == [49406, 320, 2368, 49407] + [49407] * 73
    assert two == [49406, 320, 2368, 49407] + [0] * 73
    long = tok("cat " * 100, truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def _openai_bpe():
    """OpenAI's simple_tokenizer (its algorithm, re-read from the file here): the slow reference."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs), strict=True))
    merges = gzip.open(pretrained.path(CLIP_BPE)).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(byte_encoder.values())
    vocab = (
        vocab
        + [v + "</w>" for v in vocab]
        + ["".join(m) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    encoder, ranks = {v: i for i, v in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}

    def bpe(token: str) -> list[str]:
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            first, second = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if (first, second) not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == (first, second):
                    out.append(first + second)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return list(word)

    pattern = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")  # ASCII texts

    def encode(text: str) -> list[int]:
        pieces = pattern.findall(re.sub(r"\s+", " ", text).strip().lower())
        tokens = [t for p in pieces for t in bpe("".join(byte_encoder[b] for b in p.encode()))]
        return [49406, *(encoder[t] for t in tokens), 49407]

    return encode


def test_agrees_with_openais_algorithm(pair, paper_texts, params):
    """transformers 5 has no slow CLIP tokenizer: OpenAI's pure-Python BPE stands in for it."""
    encode = _openai_bpe()
    words = emo135.names() + prompts.vocabulary(params["prompts"]["paper"])
    texts = (
        words
        + paper_texts["captions"]
        + paper_texts["prompts"][::97]
        + [params["prompts"]["paper"]["negative"]]
    )
    expected = [encode(t) for t in texts]
    for tok in pair:
        assert tok(texts).input_ids == expected
    assert sum(len(e) > 3 for e in expected[: len(emo135.names())]) > 0  # some words split: a real check


def test_no_paper_prompt_or_caption_is_truncated(pair, paper_texts, params):
    assert len(paper_texts["prompts"]) == 135 * 7 * 2 * 7 == 13230
    assert prompt_lengths.texts(params)["prompts"] == paper_texts["prompts"]
    assert prompt_lengths.texts(params)["captions"] == paper_texts["captions"]
    for kind, texts in paper_texts.items():
        n1 = [len(i) for i in pair[0](texts, truncation=False).input_ids]
        n2 = [len(i) for i in pair[1](texts, truncation=False).input_ids]
        assert n1 == n2
        assert max(n1) <= 77, kind
        # the page states the same longest count
        page = (ROOT / prompt_lengths.PAGE).read_text()
        assert f"| {kind} | {len(texts):,} | {max(n1)} | {min(n1)} |" in page


def test_prompt_lengths_page_is_current(params):
    assert (ROOT / prompt_lengths.PAGE).read_text() == prompt_lengths.render(params)
    assert prompt_lengths.main(["--check"]) == 0


@pytest.fixture(scope="module")
def saved_tiny(params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    pipe = models.sdxl_pipeline("tiny", corpus=prompts.vocabulary(params["prompts"]["default"]))
    pipe.save_pretrained(folder)
    assert (folder / "tokenizer").is_dir() and (folder / "tokenizer_2").is_dir()
    return folder, len(pipe.tokenizer)


@pytest.mark.parametrize("drop", [(), ("tokenizer_2",), ("tokenizer", "tokenizer_2")])
def test_sdxl_folder_without_tokenizers_gets_clips(saved_tiny, drop, tmp_path, caplog):
    """Only which tokenizer is attached is checked: the tiny text encoders know only the tiny vocabulary."""
    source, tiny_size = saved_tiny
    folder = tmp_path / "sdxl"
    shutil.copytree(source, folder)
    for name in drop:
        shutil.rmtree(folder / name)
    with caplog.at_level(logging.WARNING, logger="geneava.networks.models"):
        pipe = models.sdxl_pipeline(str(folder))
    assert tiny_size < 49408
    for name, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):
        tok = getattr(pipe, name)
        if name in drop:
            assert len(tok) == 49408 and tok.pad_token_id == pad
            assert tok("a photo of a cat").input_ids == KNOWN_IDS["a photo of a cat"]
        else:
            assert len(tok) == tiny_size  # the folder's own
    logged = " ".join(r.getMessage() for r in caplog.records if "tokenizer" in r.getMessage())
    assert bool(logged) == bool(drop)
    assert all(name in logged for name in drop)
