"""The one prompt template around the visual tokens (torch-free).

The sequence the LLM sees, in Gemma's turn format::

    <bos><start_of_turn>user\\n{instruction}\\n<start_of_image>   <- PREFIX (text, identical for every scan)
    [N_p visual embeddings]                                        <- raw embeddings, unscaled
    <end_of_image><end_of_turn>\\n<start_of_turn>model\\n          <- SUFFIX (text)
    {report}<end_of_turn>                                          <- TARGET (loss only here)

The instruction sits before the image so that the whole prefix is the same for every scan:
the runtime decodes it once per process and keeps it in the KV cache.

Text goes in as token ids (the LLM multiplies their embeddings by sqrt(D_llm)); visual
tokens go in as raw embeddings, which neither HF Gemma 3 nor llama.cpp scale. Attention over
the visual tokens is causal, as both HF ``Gemma3ForCausalLM(inputs_embeds=...)`` and llama.cpp
do by default, so training and runtime need no special attention mask.

Tokenizers must parse the special-token strings in the prefix and suffix (HF:
``add_special_tokens=False``; llama.cpp: ``parse_special=True``, ``add_special=False``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from radixpert.errors import ModelError

BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
UNK = "<unk>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"

SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE)

INSTRUCTION_ES = (
    "Eres un radiólogo. Redacta en español el informe de esta radiografía de tórax "
    "posteroanterior, indicando la lateralidad de cada hallazgo."
)

TEMPLATE_VERSION = 1

# How the reports name each anatomy structure. With region tokens on, a structure's tokens carry
# the LLM's own embedding of its name, so "which lung" is a word the LLM already knows.
REGION_NAMES_ES: dict[str, str] = {
    "right_lung": "pulmón derecho",
    "left_lung": "pulmón izquierdo",
    "heart": "corazón",
    "right_clavicle": "clavícula derecha",
    "left_clavicle": "clavícula izquierda",
}


def region_name(mask_name: str) -> str:
    """The Spanish name of an anatomy structure (its identifier, spaced, if it has none)."""
    return REGION_NAMES_ES.get(mask_name, mask_name.replace("_", " "))


@dataclass(frozen=True)
class PromptTemplate:
    """Text around the N_p visual embeddings; see the module docstring for the layout."""

    instruction: str = INSTRUCTION_ES
    version: int = TEMPLATE_VERSION

    @property
    def prefix(self) -> str:
        return f"{BOS}{START_OF_TURN}user\n{self.instruction}\n{START_OF_IMAGE}"

    @property
    def suffix(self) -> str:
        return f"{END_OF_IMAGE}{END_OF_TURN}\n{START_OF_TURN}model\n"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Generation stops at the first of these tokens."""
        return (END_OF_TURN, EOS)

    def target(self, report: str) -> str:
        """The text the model learns to write after the suffix."""
        return f"{report.strip()}{END_OF_TURN}"

    def to_manifest(self) -> dict[str, Any]:
        """What a bundle records, so the runtime rebuilds the exact sequence."""
        return {**asdict(self), "prefix": self.prefix, "suffix": self.suffix, "stop": list(self.stop_strings)}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "PromptTemplate":
        template = cls(instruction=data["instruction"], version=int(data["version"]))
        if data.get("prefix", template.prefix) != template.prefix or data.get("suffix", template.suffix) != template.suffix:
            raise ModelError("the bundle's prompt template differs from this radixpert version; re-export the bundle")
        return template


DEFAULT_TEMPLATE = PromptTemplate()
