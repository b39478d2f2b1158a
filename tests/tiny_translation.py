"""Tiny CTranslate2 translation models built by the tests: random weights, real layout.

No translation weights can be fetched on these machines, so the tests build models with
CTranslate2's own spec API (no torch) in the two layouts the README's conversion commands
produce: OPUS-MT/Marian (``source.spm`` + ``target.spm``) and NLLB
(``sentencepiece.bpe.model``, language codes as tokens). The SentencePiece models are
trained here on a few sentences. The output is gibberish by design: the tests assert the
loading, tokenizing, batching and decoding mechanics, not the words.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import sentencepiece as spm
from ctranslate2.specs import common_spec, transformer_spec
from ctranslate2.specs.model_spec import index_spec, visit_spec

CORPUS = [
    "первое предложение",
    "Кошка сидит на окне и смотрит на улицу.",
    "Доброе утро, коллеги, начинаем совещание.",
    "Бюджет проекта утвердят в понедельник.",
    "Спасибо всем за участие.",
    "last sentence",
    "The meeting starts at ten o'clock tomorrow.",
    "Good morning everyone, let us begin.",
    "The project budget will be approved on Monday.",
    "Thank you all for coming.",
]
D_MODEL = 16
FFN = 32
HEADS = 2


def train_sentencepiece(path: Path, vocab_size: int = 96) -> list[str]:
    """Train a tiny unigram model on CORPUS into ``path``; return its pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_file=str(path))
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def _shape(name: str, vocab: int) -> tuple[int, ...]:
    d = D_MODEL
    if name.endswith(("embeddings/weight", "embeddings_0/weight", "projection/weight")):
        return (vocab, d)
    if name.endswith(("/gamma", "/beta")):
        return (d,)
    if "/self_attention/linear_0/" in name:
        return (3 * d, d)
    if "/attention/linear_1/" in name and "/self_attention/" not in name:
        return (2 * d, d)  # cross-attention: fused keys and values
    if "/ffn/linear_0/" in name:
        return (FFN, d)
    if "/ffn/linear_1/" in name:
        return (d, FFN)
    if "/linear_" in name:
        return (d, d)
    raise AssertionError(f"no shape for {name}")


def _fill(spec: transformer_spec.TransformerSpec, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    unset: list[str] = []
    visit_spec(spec, lambda _s, name, value: unset.append(name) if value is None else None)
    for name in unset:
        scope, attribute = name.rsplit("/", 1)
        shape = _shape(name, vocab)
        value = (
            np.ones(shape, np.float32)
            if attribute == "gamma"
            else (rng.standard_normal(shape) * 0.3).astype(np.float32)
        )
        setattr(index_spec(spec, scope), attribute, value)


def build_marian(folder: Path, seed: int = 0) -> Path:
    """A Marian/OPUS-MT-shaped model as ``ct2-transformers-converter --copy_files
    source.spm target.spm`` writes it: shared vocabulary ``</s>``, ``<unk>``, pieces."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = train_sentencepiece(folder / "source.spm")
    (folder / "target.spm").write_bytes((folder / "source.spm").read_bytes())
    vocabulary = ["</s>", "<unk>"] + [p for p in pieces if p not in ("<unk>", "<s>", "</s>")]
    spec = transformer_spec.TransformerSpec.from_config(
        (1, 1), HEADS, pre_norm=False, activation=common_spec.Activation.SWISH
    )
    spec.decoder.start_from_zero_embedding = True
    spec.config.eos_token = "</s>"
    spec.config.unk_token = "<unk>"
    spec.config.decoder_start_token = "</s>"
    _fill(spec, len(vocabulary), seed)
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    spec.validate()
    spec.save(str(folder))
    return folder


def build_nllb(folder: Path, seed: int = 1) -> Path:
    """An NLLB-shaped model (``--copy_files sentencepiece.bpe.model``) with language codes."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = train_sentencepiece(folder / "sentencepiece.bpe.model")
    vocabulary = ["<s>", "<pad>", "</s>", "<unk>"]
    vocabulary += [p for p in pieces if p not in vocabulary] + ["rus_Cyrl", "eng_Latn"]
    spec = transformer_spec.TransformerSpec.from_config((1, 1), HEADS, pre_norm=True)
    spec.config.decoder_start_token = "</s>"
    _fill(spec, len(vocabulary), seed)
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    spec.validate()
    spec.save(str(folder))
    return folder
