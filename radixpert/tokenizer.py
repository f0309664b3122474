"""Tokenizers: a tiny Gemma-style one built offline for tests, and loaders for real ones.

The tiny tokenizer has the same shape as Gemma 3's ``tokenizer.json``: a BPE model with
byte fallback, spaces replaced by "▁" (no dummy prefix), and Gemma's special tokens with
Gemma's ids for ``<pad>`` (0), ``<eos>`` (1), ``<bos>`` (2) and ``<unk>`` (3). So every
conversion path (HF -> GGUF, HF vs llama.cpp tokenization) is exercised on it exactly as on
the real model.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from radixpert.errors import ModelError
from radixpert.prompt import BOS, EOS, INSTRUCTION_ES, PAD, SPECIAL_TOKENS, UNK

TINY_VOCAB_SIZE = 640

# A small Spanish radiology corpus: enough merges for realistic pieces, no download.
_CORPUS = [
    INSTRUCTION_ES,
    "Índice cardiotorácico aumentado, compatible con cardiomegalia.",
    "Silueta cardiomediastínica dentro de límites normales.",
    "Derrame pleural derecho con pinzamiento del seno costofrénico.",
    "Derrame pleural izquierdo de pequeña cuantía.",
    "Derrame pleural bilateral con menisco en ambas bases.",
    "Neumotórax derecho con línea pleural visible en el vértice.",
    "Neumotórax izquierdo sin desplazamiento mediastínico.",
    "Nódulo pulmonar en el lóbulo superior derecho.",
    "Nódulo en el lóbulo inferior izquierdo, de bordes bien definidos.",
    "Consolidación en el lóbulo medio derecho compatible con neumonía.",
    "Opacidad en el campo inferior izquierdo sugestiva de atelectasia.",
    "No se observa derrame pleural. Sin evidencia de neumotórax.",
    "No hay consolidaciones ni nódulos pulmonares.",
    "Sin hallazgos patológicos significativos.",
    "Ausencia de cardiomegalia. Senos costofrénicos libres.",
    "Hilios pulmonares de morfología y tamaño normales.",
    "Estructuras óseas sin alteraciones. Tráquea centrada.",
    "Parénquima pulmonar sin alteraciones. Diafragma de contorno normal.",
    "Posible opacidad basal derecha; descartar consolidación.",
    "Radiografía de tórax posteroanterior. Informe en español.",
    "Estudio comparado con el previo, sin cambios significativos.",
    "pinzamiento seno costofrenico derecho . cardiomegalia . nodulo pulmonar",
]


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - len(SPECIAL_TOKENS) - len(byte_tokens),
        special_tokens=[],
        show_progress=False,
        max_token_length=12,
    )
    draft = Tokenizer(BPE())
    draft.normalizer = normalizers.Replace(" ", "▁")
    draft.train_from_iterator(_CORPUS * 3, trainer=trainer)
    trained = draft.model
    trained_vocab = sorted(draft.get_vocab().items(), key=lambda item: (item[1], item[0]))

    vocab: dict[str, int] = {}
    for piece in (*SPECIAL_TOKENS, *byte_tokens, *(piece for piece, _ in trained_vocab)):
        vocab.setdefault(piece, len(vocab))
    merges = _merges_of(trained)

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer.to_str()


def _merges_of(model) -> list[tuple[str, str]]:
    """The trained merges, in rank order (read back from the model's JSON form)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = model.save(tmp)
        data = [f for f in files if os.path.basename(f).endswith("merges.txt")]
        lines = Path(data[0]).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return merges  # type: ignore[return-value]


def build_tiny_tokenizer():
    """A PreTrainedTokenizerFast with Gemma's special tokens; deterministic, offline."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        add_bos_token=False,
        add_eos_token=False,
    )


def load_tokenizer(path: str | Path):
    """A tokenizer saved in a local Hugging Face folder; checks Gemma's special tokens exist."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {exc.__class__.__name__}; pass a Hugging Face folder") from None
    missing = [t for t in SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id) and t != UNK]
    if missing:
        raise ModelError(f"tokenizer at {path} lacks Gemma special tokens {missing}; use a Gemma 3 tokenizer")
    return tokenizer
