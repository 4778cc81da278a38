"""CLIP tokenizers offline: OpenAI's real one from its BPE file, and a small learned one for the tiny models.

`clip_tokenizer` builds OpenAI CLIP's own tokenizer (49,408 tokens), which both of SDXL's text encoders
read, from the BPE vocabulary fetched by setup (`models/pretrained/clip-bpe-16e6.txt.gz`, from
open-clip-torch's wheel), exactly as OpenAI's `simple_tokenizer` does: no hub download needed.

For the tiny models there is no real vocabulary to match, so we learn a small byte-level BPE (CLIP's own
normaliser and pre-tokeniser, `</w>` word ends) from the words our prompts use. Every byte has a token, so
any text encodes; every corpus word becomes a single token, so the paper's prompts fit in CLIP's 77
positions and the expression word is never cut off.

The merges are learned here rather than with `tokenizers.trainers.BpeTrainer`, whose tie-breaking
between equally frequent pairs varies from run to run: the fine-tuning and generation stages each build
the tokenizer and must get identical token ids.
"""

from __future__ import annotations

import functools
import gzip
from collections import Counter
from collections.abc import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from geneava.networks import (
    pretrained,
)  # path(): a missing or altered file is an error saying how to fetch it

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_BPE = "clip-bpe-16e6.txt.gz"  # geneava.networks.pretrained's name for OpenAI CLIP's BPE file
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's (and GPT-2's) byte -> printable character table, in its order: the printable bytes keep
    their character, the other 68 get chr(256 + n)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    rest = [b for b in range(256) if b not in printable]
    codes = printable + [256 + n for n in range(len(rest))]
    return {b: chr(c) for b, c in zip(printable + rest, codes, strict=True)}


@functools.cache
def clip_bpe() -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """OpenAI CLIP's merges and vocabulary (id = position) from the fetched BPE file, as `simple_tokenizer`
    builds them: the 256 byte symbols, their `</w>` forms, one token per merge, then start and end."""
    lines = gzip.decompress(pretrained.path(CLIP_BPE).read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    alphabet = list(bytes_to_unicode().values())
    vocab = (*alphabet, *(a + "</w>" for a in alphabet), *("".join(m) for m in merges), BOS, EOS)
    if len(set(vocab)) != CLIP_VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{CLIP_BPE} does not give CLIP's {CLIP_VOCAB_SIZE} distinct tokens")
    return merges, vocab


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (lower-cased, at most 77 positions), built offline from the fetched BPE file.

    SDXL's `tokenizer` pads with <|endoftext|> (the default); its `tokenizer_2` pads with "!" (id 0), which
    its config also marks special, so a "!" in a text becomes id 0 there, as with the hub's files."""
    merges, vocab = clip_bpe()
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def learn_merges(words: Iterable[tuple[str, ...]]) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair (ties: the smallest pair) until each word is
    one symbol. Deterministic for a given set of words."""
    words = [list(w) for w in sorted(set(words))]
    merges = []
    while True:
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [joined]
                i += 1


def train_clip_tokenizer(corpus: Iterable[str]) -> CLIPTokenizer:
    """A CLIPTokenizer whose merges are learned from `corpus` (deterministic for a given corpus)."""
    reference = CLIPTokenizer().backend_tokenizer  # the exact normaliser + pre-tokeniser CLIP uses
    words = set()
    for text in corpus:
        for piece, _ in reference.pre_tokenizer.pre_tokenize_str(reference.normalizer.normalize_str(text)):
            words.add((*piece[:-1], piece[-1] + "</w>"))
    merges = learn_merges(words)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
