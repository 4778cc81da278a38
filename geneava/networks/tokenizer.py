"""An offline CLIP tokenizer for the tiny models.

The real SDXL tokenizers come with the real weights. Offline there is no vocabulary to download, so
we learn a small byte-level BPE (CLIP's own normaliser and pre-tokeniser, `</w>` word ends) from the
words our prompts use. Every byte has a token, so any text encodes; every corpus word becomes a single
token, so the paper's prompts fit in CLIP's 77 positions and the expression word is never cut off.

The merges are learned here rather than with `tokenizers.trainers.BpeTrainer`, whose tie-breaking
between equally frequent pairs varies from run to run: the fine-tuning and generation stages each build
the tokenizer and must get identical token ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


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
