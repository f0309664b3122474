"""radixpert-eval mirror: the side-word probe reads the right logits, and mirroring really mirrors.

The tiny test model is nearly blind to a left-right flip (its visual tokens move by 5e-4 of
their scale), so the probe's end-to-end effect is measured on the demo bundle
(evaluation/results/mirror-demo-seed7); here each part is checked on its own.

The preference is checked against PyTorch (the run's merged model fed the same visual tokens
and text), not against numbers the probe computed itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from radixpert.bundle import load_bundle
from radixpert.evaluation.mirror import OPPOSITE, SIDE_WORD, image_and_mirror, preference, side_probes
from radixpert.imageio import letterbox_resize, normalize_imagenet, read_display
from radixpert.export.merge import load_run, merge_lora
from radixpert.runtime.llm import LlamaRunner

REPORT = "Neumotórax derecho. Derrame pleural izquierdo."


@pytest.fixture(scope="module")
def runner(bundle):
    out, _ = bundle
    loaded = load_bundle(out)
    with LlamaRunner(loaded.llm_path("f32"), n_ctx=loaded.manifest["llm"]["n_ctx"], threads=2) as llm:
        yield loaded, llm


def test_probes_sit_at_each_side_word(runner):
    _, llm = runner
    probes = side_probes(llm, 0, REPORT)
    assert [p.word for p in probes] == ["derecho", "izquierdo"]
    for probe, match in zip(probes, SIDE_WORD.finditer(REPORT)):
        before = REPORT[: match.start()]
        # The choice point is where the two spellings' tokens first differ (a tokenizer may glue
        # the space to the word before): the context plus either token must spell that side.
        context = llm.detokenize(probe.context_ids)
        right = llm.detokenize(probe.context_ids + [probe.correct])
        wrong = llm.detokenize(probe.context_ids + [probe.opposite])
        assert before.startswith(context) and len(context) >= len(before.strip()) - 2, (context, before)
        assert (before + probe.word).startswith(right) and (before + OPPOSITE[probe.word]).startswith(wrong)
        assert probe.correct != probe.opposite


def test_preference_matches_pytorch(runner, run_dir):
    loaded, llm = runner
    model, _, _ = load_run(run_dir)
    merge_lora(model)
    model.eval()
    visual = np.random.default_rng(0).normal(0, 0.05, (loaded.config.num_visual_tokens, loaded.config.llm_dim))
    visual = visual.astype(np.float32)
    probes = side_probes(llm, 0, REPORT)
    tokens = loaded.token_ids
    got = preference(llm, tokens["prefix"], visual, tokens["suffix"], probes)
    for probe, value in zip(probes, got):
        embeds = torch.cat([model.embed_text(list(tokens["prefix"])), torch.from_numpy(visual),
                            model.embed_text(list(tokens["suffix"]) + probe.context_ids)])
        with torch.no_grad():
            logits = model.llm(inputs_embeds=embeds[None]).logits[0, -1].double()
        expected = float(logits[probe.correct] - logits[probe.opposite])
        # The runtime's CPU attention keeps V in BF16: f32 logits sit up to 1.5e-3 of their scale from
        # PyTorch's (test_export.py), so a difference of two can be off by about 4e-3 (measured 4.2e-3).
        assert value == pytest.approx(expected, abs=6e-3 + 1e-3 * abs(expected)), (probe.word, value, expected)


def test_the_second_input_is_the_mirrored_scan(tmp_path):
    y, x = np.mgrid[0:300, 0:256]
    pixels = 20000 + 40000 * np.exp(-((x - 60) ** 2 + (y - 128) ** 2) / 800.0)
    path = tmp_path / "scan.png"
    Image.fromarray(pixels.astype(np.uint16)).save(path)
    inputs = image_and_mirror(path, 224)
    display, _ = read_display(path)
    flipped = normalize_imagenet(letterbox_resize(np.fliplr(display), 224))
    np.testing.assert_array_equal(inputs[1], flipped)
    np.testing.assert_array_equal(inputs[0], normalize_imagenet(letterbox_resize(display, 224)))
    assert np.abs(inputs[0] - inputs[1]).max() > 0.5  # the blob moved to the other side
