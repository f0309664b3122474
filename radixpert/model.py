"""The reference model (PyTorch), exactly the paper's Section IV.

    H_v      = f_vis(I)                    (B, N_p, D_v)      frozen encoder
    M_raw    = sigmoid(g_seg(I))           (B, K, H, W)       frozen U-Net
    M_down   = pool(M_raw)                 (B, K, G, G)       exact area pooling, G = sqrt(N_p)
    H_seg    = Conv1x1(M_down)             (B, D_emb, G, G)   trainable
    H_fused  = concat(H_v, flatten(H_seg)) (B, N_p, D_v + D_emb)
    X_prompt = MLP(H_fused)                (B, N_p, D_llm)    trainable
    (region_tokens: 2K more rows of H_fused, mean and max over each mask, before the MLP;
     after it, each pair gets the LLM's embedding of its structure's name)
    report   = LLM + LoRA(X_prompt)                           LoRA trainable

Every later stage (ONNX, GGUF, runtime) is tested against this module.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from radixpert.config import RadixpertConfig
from radixpert.errors import ModelError
from radixpert.prompt import DEFAULT_TEMPLATE, PromptTemplate, region_name

IGNORE_INDEX = -100


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class TinyCNNEncoder(nn.Module):
    """A small CNN with the encoder's stride: (B, 3, S, S) -> (B, D_v, G, G)."""

    def __init__(self, config: RadixpertConfig):
        super().__init__()
        stages = int(math.log2(config.encoder_stride))
        if 2**stages != config.encoder_stride:
            raise ModelError(f"tiny_cnn needs a power-of-two stride, got {config.encoder_stride}")
        widths = [config.encoder_width * 2**i for i in range(stages)]
        layers, cin = [], 3
        for width in widths:
            layers += [_conv_bn_relu(cin, width, stride=2), _conv_bn_relu(width, width)]
            cin = width
        layers.append(nn.Conv2d(cin, config.vision_dim, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


class BioViLEncoder(nn.Module):
    """BioViL's ResNet-50 trunk with a dilated last stage: 224² -> (B, 2048, 14, 14)."""

    def __init__(self, config: RadixpertConfig):
        super().__init__()
        try:
            from torchvision.models import resnet50
        except ImportError:
            raise ModelError("the biovil encoder needs torchvision; install radixpert-edge[train]") from None
        net = resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        self._names = {f"{i}.": n for i, n in enumerate(["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"])}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk(image)

    def load_resnet_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load torchvision-named ResNet-50 weights found under any prefix (BioViL nests them)."""
        anchor = next((k[: -len("conv1.weight")] for k in state if k.endswith("conv1.weight") and "layer" not in k), None)
        if anchor is None:
            raise ModelError("encoder checkpoint holds no ResNet-50 (no conv1.weight); pass a BioViL image checkpoint")
        by_name = {k[len(anchor) :]: v for k, v in state.items() if k.startswith(anchor)}
        mine = {}
        for key in self.trunk.state_dict():
            index, rest = key.split(".", 1)
            source = f"{self._names[index + '.']}.{rest}"
            if source not in by_name:
                raise ModelError(f"encoder checkpoint lacks {source}; is it a ResNet-50?")
            mine[key] = by_name[source]
        self.trunk.load_state_dict(mine)


class UNet(nn.Module):
    """A plain U-Net: (B, 3, S, S) -> (B, K, S, S) logits. Transposed convs, no resize ops."""

    def __init__(self, config: RadixpertConfig):
        super().__init__()
        widths = [config.segmenter_width * 2**i for i in range(config.segmenter_depth + 1)]
        self.down = nn.ModuleList()
        cin = 3
        for width in widths:
            self.down.append(nn.Sequential(_conv_bn_relu(cin, width), _conv_bn_relu(width, width)))
            cin = width
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.merge.append(nn.Sequential(_conv_bn_relu(width * 2, width), _conv_bn_relu(width, width)))
        self.head = nn.Conv2d(widths[0], config.num_masks, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips, x = [], image
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def area_pooling_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) weights that average each output cell's input span, like adaptive_avg_pool.

    Cell i covers [floor(i*in/out), ceil((i+1)*in/out)), the same spans as
    ``F.adaptive_avg_pool2d``, so the result is identical for any sizes, divisible or not,
    and exports to ONNX as two matmuls.
    """
    weights = torch.zeros(out_size, in_size)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


# Added to patches outside a structure before the max: far below any feature, finite so an
# empty mask gives a bounded token rather than -inf.
OUTSIDE = -1.0e4


class AnatomyFusion(nn.Module):
    """The trainable part of the frontend: pool, Conv1x1, concat and MLP projector."""

    def __init__(self, config: RadixpertConfig):
        super().__init__()
        pool = area_pooling_matrix(config.image_size, config.grid_size)
        self.use_anatomy = config.use_anatomy
        self.region_tokens = config.region_tokens
        # Derived from the config, so not saved with the weights.
        self.register_buffer("pool_rows", pool, persistent=False)
        self.register_buffer("pool_cols_t", pool.t().contiguous(), persistent=False)
        self.mask_proj = nn.Conv2d(config.num_masks, config.mask_embed_dim, kernel_size=1)
        dims = [config.vision_dim + config.mask_embed_dim]
        dims += [config.projector_hidden] * (config.projector_depth - 1) + [config.llm_dim]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(cin, cout))
        self.projector = nn.Sequential(*layers)
        if self.region_tokens:
            # The names' embeddings come from the LLM (RadixpertModel sets them), not from training.
            self.register_buffer("region_anchors", torch.zeros(config.num_masks, config.llm_dim), persistent=False)

    def pool_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) -> (B, K, G, G): the fraction of each patch covered by each structure."""
        return self.pool_rows @ masks @ self.pool_cols_t

    def forward(self, patch_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_masks(masks)
        if not self.use_anatomy:  # ablation: the same path, with no anatomy in it
            pooled = torch.zeros_like(pooled)
        mask_embed = self.mask_proj(pooled)  # (B, D_emb, G, G)
        fused = torch.cat([patch_features, mask_embed.flatten(2).transpose(1, 2)], dim=-1)
        if not self.region_tokens:
            return self.projector(fused)
        tokens = self.projector(torch.cat([fused, self.region_summaries(fused, pooled)], dim=1))
        n = patch_features.shape[1]
        anchors = torch.cat([self.region_anchors, self.region_anchors])  # the mean and the max token
        return torch.cat([tokens[:, :n], tokens[:, n:] + anchors], dim=1)

    @staticmethod
    def region_summaries(fused: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B, N_p, D) features, (B, K, G, G) coverage -> (B, 2K, D): per structure, the
        coverage-weighted mean, then the max over the patches it covers at least half as
        much as its best-covered patch (the max keeps a small finding a mean would dilute)."""
        coverage = pooled.flatten(2)  # (B, K, N_p)
        mean = (coverage @ fused) / (coverage.sum(-1, keepdim=True) + 1e-6)
        inside = coverage > 0.5 * coverage.amax(-1, keepdim=True)
        peak = (fused[:, None] + torch.where(inside, 0.0, OUTSIDE)[..., None]).amax(dim=2)
        return torch.cat([mean, peak], dim=1)


POOLS = ("mean-max", "mean")


class EvidenceHead(nn.Module):
    """The encoder's presence (and side) head: global pooling, one linear layer, sigmoid.

    Pooling is the mean over the grid, or the mean and the max (a nodule covers one or two of
    the 196 cells, where a mean alone dilutes it). ``outputs`` names each probability, e.g.
    ``presence:nodule`` or ``left:nodule``; it is saved with the weights and recorded in the bundle.
    """

    def __init__(self, vision_dim: int, outputs: list[str], pool: str = "mean-max"):
        super().__init__()
        if pool not in POOLS:
            raise ModelError(f"unknown encoder head pooling {pool!r}; use one of {', '.join(POOLS)}")
        self.pool, self.outputs = pool, list(outputs)
        self.linear = nn.Linear(vision_dim * (2 if pool == "mean-max" else 1), len(self.outputs))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D_v, G, G) encoder features -> (B, D_v or 2 D_v): the mean, or the mean and the max, over the grid."""
        mean = features.mean(dim=(2, 3))
        return torch.cat([mean, features.amax(dim=(2, 3))], dim=1) if self.pool == "mean-max" else mean

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D_v, G, G) encoder features -> (B, len(outputs)) logits."""
        return self.linear(self.pooled(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features))

    def save(self, path: str | Path, what: str) -> None:
        """Weights as safetensors, with the pooling and output names in the file's metadata."""
        import json

        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.linear.state_dict().items()}
        save_file(state, str(path), metadata={"radixpert": what, "pool": self.pool, "outputs": json.dumps(self.outputs)})

    @classmethod
    def load(cls, path: str | Path, vision_dim: int) -> "EvidenceHead":
        """A head saved by :meth:`save`; ModelError when the file is missing or does not fit."""
        import json

        from safetensors import safe_open

        file = Path(path)
        if not file.is_file():
            raise ModelError(f"encoder head {file} not found; pass the encoder_head.safetensors of the encoder run")
        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
                state = {k: handle.get_tensor(k) for k in handle.keys()}
            head = cls(vision_dim, json.loads(meta["outputs"]), meta.get("pool", "mean-max"))
            head.linear.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"encoder head {file} does not fit this encoder ({exc.__class__.__name__}); "
                             "use the head saved by the same encoder run") from None
        return head


class Frontend(nn.Module):
    """Image -> (visual tokens (B, N_visual, D_llm), anatomy maps (B, K, S, S)[, evidence (B, E)]).

    N_visual is config.num_visual_tokens. With an encoder head attached (``attach_evidence``),
    a third output gives the head's probabilities, the image's own evidence for the report checks.
    """

    def __init__(self, config: RadixpertConfig):
        super().__init__()
        self.encoder = TinyCNNEncoder(config) if config.encoder == "tiny_cnn" else BioViLEncoder(config)
        self.segmenter = UNet(config)
        self.fusion = AnatomyFusion(config)
        self.evidence: EvidenceHead | None = None

    @classmethod
    def from_state(cls, config: RadixpertConfig, state: dict[str, torch.Tensor],
                   evidence: dict | None = None) -> "Frontend":
        """A frontend loaded strictly from a bundle's ``frontend.safetensors``; ``evidence`` is the
        manifest's ``visual.evidence`` (output names and pooling) when the bundle has a head."""
        frontend = cls(config)
        if evidence:
            frontend.attach_evidence(EvidenceHead(config.vision_dim, evidence["outputs"], evidence.get("pool", "mean-max")))
        frontend.load_state_dict(state)
        return frontend

    def attach_evidence(self, head: EvidenceHead) -> None:
        """Add the encoder's frozen presence/side head as a third output."""
        self.evidence = head.requires_grad_(False).eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.encoder(image)
        patch_features = features.flatten(2).transpose(1, 2)  # row-major patches
        masks = torch.sigmoid(self.segmenter(image))
        tokens = self.fusion(patch_features, masks)
        if self.evidence is None:
            return tokens, masks
        return tokens, masks, self.evidence(features)


def load_safetensors_into(module: nn.Module, path: str | Path, what: str) -> None:
    """Load weights from safetensors (or a tensors-only .pt via weights_only=True)."""
    file = Path(path)
    if not file.exists():
        raise ModelError(f"{what} checkpoint {file} not found; pass the local path of its weights")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise ModelError(f"{what} checkpoint {file} is not a plain tensor file ({exc.__class__.__name__}); convert it to safetensors") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if isinstance(module, BioViLEncoder):
        module.load_resnet_state(state)
        return
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{what} checkpoint {file} does not fit the config: {first}") from None


def apply_lora(llm: nn.Module, config: RadixpertConfig):
    """Wrap the LLM with peft LoRA on the configured attention projections."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        bias="none",
    )
    return get_peft_model(llm, lora)


class RadixpertModel(nn.Module):
    """Frozen encoder and segmenter, trainable fusion, LLM with LoRA; the parity reference."""

    def __init__(self, config: RadixpertConfig, llm: nn.Module, tokenizer, template: PromptTemplate = DEFAULT_TEMPLATE):
        super().__init__()
        self.config = config
        self.template = template
        self.tokenizer = tokenizer
        self.frontend = Frontend(config)
        self.llm = llm
        self.prefix_ids = self._ids(template.prefix)
        self.suffix_ids = self._ids(template.suffix)
        self.stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in template.stop_strings}
        if config.region_tokens:
            with torch.no_grad():
                names = [self.embed_text(self._ids(region_name(m))).mean(dim=0) for m in config.mask_names]
                self.frontend.fusion.region_anchors.copy_(torch.stack(names))
        self.freeze_experts()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def frozen_experts(self) -> tuple[nn.Module, ...]:
        experts = (self.frontend.encoder, self.frontend.segmenter)
        return experts + ((self.frontend.evidence,) if self.frontend.evidence is not None else ())

    def freeze_experts(self) -> None:
        for expert in self.frozen_experts:
            expert.requires_grad_(False)
            expert.eval()

    def train(self, mode: bool = True) -> "RadixpertModel":
        super().train(mode)
        # Frozen experts keep eval-mode batch norm statistics even while the rest trains.
        for expert in self.frozen_experts:
            expert.eval()
        return self

    def embed_text(self, ids: list[int]) -> torch.Tensor:
        """(L, D_llm) embeddings of text ids, with the LLM's own sqrt(D_llm) scaling."""
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))

    def build_inputs(
        self, visual_tokens: torch.Tensor, targets: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, L, D), attention mask (B, L) and labels (B, L), right-padded.

        Labels are IGNORE_INDEX everywhere except the report tokens.
        """
        prefix, suffix = self.embed_text(self.prefix_ids), self.embed_text(self.suffix_ids)
        rows, labels = [], []
        for b in range(visual_tokens.shape[0]):
            target = targets[b] if targets is not None else []
            parts = [prefix, visual_tokens[b].to(prefix.dtype), suffix]
            if target:
                parts.append(self.embed_text(target))
            rows.append(torch.cat(parts, dim=0))
            context = len(self.prefix_ids) + visual_tokens.shape[1] + len(self.suffix_ids)
            labels.append([IGNORE_INDEX] * context + list(target))
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
        label_tensor = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
        for b, (row, label) in enumerate(zip(rows, labels)):
            embeds[b, : row.shape[0]] = row
            mask[b, : row.shape[0]] = 1
            label_tensor[b, : len(label)] = torch.tensor(label, dtype=torch.long)
        return embeds, mask, label_tensor

    def encode_reports(self, reports: list[str]) -> list[list[int]]:
        return [self._ids(self.template.target(r)) for r in reports]

    def forward(
        self, image: torch.Tensor, reports: list[str], token_weights: list[list[float]] | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy over the report tokens only (see ``report_loss``)."""
        return self.report_loss(self.frontend(image)[0], reports, token_weights)

    def report_loss(
        self, visual_tokens: torch.Tensor, reports: list[str], token_weights: list[list[float]] | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy over the report tokens, given the frontend's visual tokens.

        ``token_weights`` (one per report token, as ``encode_reports`` splits them) scales each
        token's loss; the mean still divides by the token count, so weight 1 everywhere is the plain loss.
        """
        embeds, mask, labels = self.build_inputs(visual_tokens, self.encode_reports(reports))
        # Logits only where a report token is predicted: the 262k-row output head over the 196
        # visual positions would cost more than the rest of the network and predicts nothing.
        first = int((labels != IGNORE_INDEX).any(dim=0).nonzero()[0])
        keep = torch.arange(first - 1, labels.shape[1] - 1, device=labels.device)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits
        targets = labels[:, first:]
        if token_weights is None:
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        weights = torch.zeros_like(losses)
        # Report tokens in row-major order are exactly the concatenated per-report weights.
        weights[targets != IGNORE_INDEX] = torch.tensor([w for row in token_weights for w in row], device=losses.device)
        return (losses * weights).sum() / (targets != IGNORE_INDEX).sum()

    @torch.no_grad()
    def generate(self, image: torch.Tensor, max_new_tokens: int | None = None, ignore_stop: bool = False) -> list[list[int]]:
        """Greedy decoding, one image at a time: the reference every parity test compares to.

        ``ignore_stop`` decodes exactly ``max_new_tokens`` (parity checks need a fixed length).
        """
        limit = max_new_tokens if max_new_tokens is not None else self.config.max_new_tokens
        visual_tokens = self.frontend(image)[0]
        outputs = []
        for b in range(visual_tokens.shape[0]):
            embeds, _, _ = self.build_inputs(visual_tokens[b : b + 1])
            result = self.llm(inputs_embeds=embeds, use_cache=True)
            tokens: list[int] = []
            while len(tokens) < limit:
                next_id = int(result.logits[0, -1].argmax())
                if next_id in self.stop_ids and not ignore_stop:
                    break
                tokens.append(next_id)
                step = torch.tensor([[next_id]], device=embeds.device)
                result = self.llm(input_ids=step, cache=result.cache, use_cache=True)
            outputs.append(tokens)
        return outputs

    def generate_text(self, image: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in self.generate(image, max_new_tokens)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def build_model(config: RadixpertConfig, template: PromptTemplate = DEFAULT_TEMPLATE) -> RadixpertModel:
    """The full model for a config: experts loaded from their paths if given, LLM with LoRA
    (or, with ``use_lora`` off, the LLM frozen as it is)."""
    from radixpert.hf_models import check_llm_shape, load_llm

    config.validate()
    torch.manual_seed(config.seed)
    llm, tokenizer = load_llm(config)
    check_llm_shape(llm, config)
    llm = apply_lora(llm, config) if config.use_lora else llm.requires_grad_(False)
    model = RadixpertModel(config, llm, tokenizer, template)
    if config.encoder_path:
        load_safetensors_into(model.frontend.encoder, config.encoder_path, "encoder")
    if config.segmenter_path:
        load_safetensors_into(model.frontend.segmenter, config.segmenter_path, "segmenter")
    if config.encoder_head_path:
        model.frontend.attach_evidence(EvidenceHead.load(config.encoder_head_path, config.vision_dim))
    model.freeze_experts()
    return model
