"""The reference model: frozen experts, trainable fusion + LoRA, exact pooling, greedy reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixpert.model import IGNORE_INDEX, area_pooling_matrix, count_parameters

REPORTS = ["Derrame pleural derecho.", "Sin hallazgos patológicos significativos. Índice cardiotorácico normal."]


def _images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("size", "grid"), [(224, 14), (100, 14), (37, 5), (448, 14)])
def test_area_pooling_equals_adaptive_avg_pool(size, grid):
    masks = torch.rand(2, 5, size, size, generator=torch.Generator().manual_seed(size))
    pool = area_pooling_matrix(size, grid)
    torch.testing.assert_close(pool @ masks @ pool.t(), F.adaptive_avg_pool2d(masks, grid), rtol=1e-5, atol=1e-6)


def test_frontend_shapes_follow_the_paper(tiny_model, tiny_config):
    tokens, maps = tiny_model.frontend(_images())
    assert tokens.shape == (2, tiny_config.num_patches, tiny_config.llm_dim)
    assert maps.shape == (2, tiny_config.num_masks, tiny_config.image_size, tiny_config.image_size)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def _lora_count(config, llm_config) -> int:
    q_out = config.llm_heads * config.llm_head_dim
    kv_out = config.llm_kv_heads * config.llm_head_dim
    shapes = {"q_proj": (config.llm_dim, q_out), "k_proj": (config.llm_dim, kv_out),
              "v_proj": (config.llm_dim, kv_out), "o_proj": (q_out, config.llm_dim),
              "gate_proj": (config.llm_dim, config.llm_ffn), "up_proj": (config.llm_dim, config.llm_ffn),
              "down_proj": (config.llm_ffn, config.llm_dim)}
    per_layer = sum(config.lora_rank * (shapes[t][0] + shapes[t][1]) for t in config.lora_targets)
    return per_layer * llm_config.num_hidden_layers


def test_trainable_count_equals_the_formula(tiny_model, tiny_config):
    c = tiny_config
    conv = c.num_masks * c.mask_embed_dim + c.mask_embed_dim
    dims = [c.vision_dim + c.mask_embed_dim] + [c.projector_hidden] * (c.projector_depth - 1) + [c.llm_dim]
    mlp = sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))
    trainable, total = count_parameters(tiny_model)
    assert trainable == conv + mlp + _lora_count(c, tiny_model.llm.config)
    assert total > trainable


def test_frozen_experts_stay_in_eval_mode(tiny_model):
    tiny_model.train()
    assert not tiny_model.frontend.encoder.training and not tiny_model.frontend.segmenter.training
    assert tiny_model.frontend.fusion.training
    assert not any(p.requires_grad for p in tiny_model.frontend.encoder.parameters())


def test_optimizer_step_changes_only_conv_mlp_and_lora(tiny_model):
    before = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.train()
    optimizer = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    loss = tiny_model(_images(), REPORTS)
    loss.backward()
    optimizer.step()
    after = tiny_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    for key in changed:
        assert "fusion.mask_proj" in key or "fusion.projector" in key or "lora_" in key, key
    for key in before:  # the experts, BN buffers included, are bit-identical
        if key.startswith(("frontend.encoder.", "frontend.segmenter.")):
            assert torch.equal(before[key], after[key]), key
    assert any("fusion.mask_proj" in k for k in changed) and any("fusion.projector" in k for k in changed)
    assert any("lora_B" in k for k in changed)


def test_loss_covers_report_tokens_only(tiny_model):
    visual, _ = tiny_model.frontend(_images())
    targets = tiny_model.encode_reports(REPORTS)
    embeds, mask, labels = tiny_model.build_inputs(visual, targets)
    context = len(tiny_model.prefix_ids) + visual.shape[1] + len(tiny_model.suffix_ids)
    for b, target in enumerate(targets):
        supervised = labels[b][labels[b] != IGNORE_INDEX].tolist()
        assert supervised == target
        assert (labels[b, :context] == IGNORE_INDEX).all()
        assert int(mask[b].sum()) == context + len(target)
    # The model's loss is the mean token cross-entropy over exactly those positions.
    logits = tiny_model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(tiny_model(_images(), REPORTS), manual, rtol=1e-5, atol=1e-5)


def test_visual_tokens_enter_unscaled_and_text_scaled(tiny_model):
    visual = torch.randn(1, 196, tiny_model.config.llm_dim)
    embeds, _, _ = tiny_model.build_inputs(visual)
    start = len(tiny_model.prefix_ids)
    torch.testing.assert_close(embeds[0, start : start + 196], visual[0])
    table = tiny_model.llm.get_input_embeddings().weight
    scale = tiny_model.config.llm_dim**0.5
    torch.testing.assert_close(embeds[0, 0], table[tiny_model.prefix_ids[0]] * scale, rtol=1e-3, atol=1e-4)


def test_greedy_generate_is_consistent_with_a_full_forward_pass(tiny_model):
    image = _images(1, seed=3)
    tokens = tiny_model.generate(image, max_new_tokens=12)[0]
    assert tokens and len(tokens) <= 12
    visual, _ = tiny_model.frontend(image)
    embeds, _, _ = tiny_model.build_inputs(visual, [tokens])
    with torch.no_grad():
        logits = tiny_model.llm(inputs_embeds=embeds).logits[0]
    start = embeds.shape[1] - len(tokens) - 1
    assert logits[start : start + len(tokens)].argmax(-1).tolist() == tokens
    assert tiny_model.generate(image, max_new_tokens=12)[0] == tokens  # deterministic
    # The text is the decoded greedy tokens, without the template's special tokens.
    assert tiny_model.generate_text(image, max_new_tokens=12)[0] == tiny_model.tokenizer.decode(tokens, skip_special_tokens=True)


def test_different_images_give_different_visual_tokens(tiny_model):
    a, _ = tiny_model.frontend(_images(1, seed=1))
    b, _ = tiny_model.frontend(_images(1, seed=2))
    assert not torch.allclose(a, b)


def _fusion_inputs(config, finding_column: int | None = None):
    """Patch features and hand-drawn masks: right lung in image columns 0-6, left lung in 7-13
    (radiological view), heart, clavicles in small boxes; optionally one bright patch."""
    from radixpert.model import AnatomyFusion

    torch.manual_seed(0)
    fusion = AnatomyFusion(config.replace(region_tokens=True)).eval()
    g, s = config.grid_size, config.image_size
    features = torch.randn(1, g * g, config.vision_dim, generator=torch.Generator().manual_seed(1))
    if finding_column is not None:
        features[0, 6 * g + finding_column] += 5.0
    masks = torch.zeros(1, config.num_masks, s, s)
    half, cell = s // 2, s // g
    masks[0, 0, cell : s - cell, :half] = 1.0
    masks[0, 1, cell : s - cell, half:] = 1.0
    masks[0, 2, half : s - cell, half - 2 * cell : half + 2 * cell] = 1.0
    masks[0, 3, :cell, :half] = 1.0
    masks[0, 4, :cell, half:] = 1.0
    return fusion, features, masks


def test_region_tokens_follow_the_patches_and_summarize_each_structure(tiny_config):
    from radixpert.model import AnatomyFusion

    fusion, features, masks = _fusion_inputs(tiny_config)
    plain = AnatomyFusion(tiny_config)
    plain.load_state_dict(fusion.state_dict())  # region tokens add no weights
    with torch.no_grad():
        tokens = fusion(features, masks)
        patches = plain(features, masks)
        pooled = fusion.pool_masks(masks).flatten(2)[0]
        fused = torch.cat([features[0], fusion.mask_proj(fusion.pool_masks(masks)).flatten(2)[0].t()], dim=-1)
    k, n = tiny_config.num_masks, tiny_config.num_patches
    assert tokens.shape == (1, tiny_config.replace(region_tokens=True).num_visual_tokens, tiny_config.llm_dim) == (1, n + 2 * k, tiny_config.llm_dim)
    torch.testing.assert_close(tokens[:, :n], patches)
    for m in range(k):
        weights = pooled[m]
        mean = (weights[:, None] * fused).sum(0) / weights.sum()
        peak = fused[weights > 0.5 * weights.max()].max(dim=0).values
        with torch.no_grad():
            torch.testing.assert_close(tokens[0, n + m], fusion.projector(mean), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(tokens[0, n + k + m], fusion.projector(peak), rtol=1e-4, atol=1e-5)


def test_a_finding_moves_only_the_tokens_of_its_side(tiny_config):
    """A bright patch in the image's right half (the patient's left lung) changes the left-lung
    region tokens and leaves the right lung's alone; mirrored, the other way round."""
    k, n = tiny_config.num_masks, tiny_config.num_patches
    right, left = [n, n + k], [n + 1, n + k + 1]  # mean and max tokens of each lung
    fusion, features, masks = _fusion_inputs(tiny_config)
    with torch.no_grad():
        base = fusion(features, masks)[0]
        for column, moved, still in ((10, left, right), (3, right, left)):
            _, shifted, _ = _fusion_inputs(tiny_config, finding_column=column)
            changed = (fusion(shifted, masks)[0] - base).abs().amax(dim=-1)
            assert bool((changed[moved] > 1e-3).all()) and bool((changed[still] == 0).all()), (column, changed[n:])


def test_region_tokens_carry_the_llm_embedding_of_their_structure_name(tiny_config):
    from radixpert.model import build_model
    from radixpert.prompt import region_name

    model = build_model(tiny_config.replace(region_tokens=True))
    last = model.frontend.fusion.projector[-1]
    with torch.no_grad():  # a projector that outputs zeros leaves only the names
        last.weight.zero_()
        last.bias.zero_()
        tokens, _ = model.frontend(_images(1))
    n, k = tiny_config.num_patches, tiny_config.num_masks
    assert float(tokens[0, :n].abs().max()) == 0.0
    for m, mask in enumerate(tiny_config.mask_names):
        ids = model.tokenizer(region_name(mask), add_special_tokens=False)["input_ids"]
        name = model.embed_text(ids).mean(dim=0)
        torch.testing.assert_close(tokens[0, n + m], name)
        torch.testing.assert_close(tokens[0, n + k + m], name)
    assert region_name("left_lung") == "pulmón izquierdo"
