"""Issue 13: Grad-CAM and HiResCAM on vision-transformer tokens (token grids), the default layer on a transformer,
and the tiny ViT in the randomization cascade."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lens.attribution import GradCAM, HiResCAM
from lightning_lens.attribution._token_grid import grid_shape
from lightning_lens.attribution.gradcam import last_cam_layer, last_spatial_layer
from lightning_lens.sanity.layers import find_layers
from lightning_lens.testing.models import SmallCNN, TinyViT


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return TinyViT(image_size=8, patch_size=2, num_classes=3, dim=16, heads=2, depth=2).eval()


def layer_output_and_grad(model, layer, x, target):
    """The layer's (B, N, D) output and the gradient of the target logits with respect to it, by a hook."""
    saved = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: saved.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), saved[0])
    return saved[0].detach(), grad


def hand_cam(tokens, grads, side, hires):
    """Per example: drop [CLS], patch n -> (row n // side, col n % side); Grad-CAM or HiResCAM; ReLU."""
    b, n, d = tokens.shape
    maps = torch.zeros(b, 1, side, side)
    for i in range(b):
        weights = grads[i, 1:].mean(0)  # (D,): mean over the patches
        for p in range(n - 1):
            value = (grads[i, 1 + p] * tokens[i, 1 + p]).sum() if hires else (weights * tokens[i, 1 + p]).sum()
            maps[i, 0, p // side, p % side] = max(float(value), 0.0)
    return maps


@pytest.mark.parametrize("method", [GradCAM, HiResCAM])
@pytest.mark.parametrize("layer", ["encoder.layers.0", "encoder.layers.1.norm1"])
def test_token_grid_cam_equals_hand_computation(vit, method, layer):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2])
    tokens, grads = layer_output_and_grad(vit, layer, x, target)
    expected = hand_cam(tokens, grads, 4, hires=method is HiResCAM)
    grid = method(vit, layer=layer, upsample=False).attribute(x, target=target)
    assert grid.shape == (3, 1, 4, 4)
    assert torch.allclose(grid, expected, atol=1e-6)
    assert expected.abs().sum() > 0
    image = method(vit, layer=layer).attribute(x, target=target)
    assert image.shape == (3, 1, 8, 8)
    assert torch.allclose(image, F.interpolate(expected, size=(8, 8), mode="bilinear", align_corners=False), atol=1e-6)


def test_regression_token_layer_was_treated_as_channels(vit):
    # before: the (B, 17, 16) block output was read as 17 channels x 16 positions, a map over hidden units (B, 1, 16)
    x = torch.rand(2, 1, 8, 8)
    assert GradCAM(vit, layer="encoder.layers.0", upsample=False).attribute(x).shape == (2, 1, 4, 4)


def test_regression_default_layer_on_a_transformer(vit):
    # before: the default search picked the patch-embedding convolution, the last module with a 4-D output
    x = torch.rand(2, 1, 8, 8)
    cam = GradCAM(vit)
    cam.attribute(x)
    assert cam.layer_name == "encoder.layers.1.norm1"  # the input of the last attention: patches still reach [CLS]
    # the last block's output itself gives a zero map with a [CLS] head: nothing after the last attention reaches it
    assert GradCAM(vit, layer="encoder.layers.1", relu=False).attribute(x).abs().max() == 0


def test_default_layer_of_a_mean_pooled_vit_is_the_final_norm():
    torch.manual_seed(0)
    model = TinyViT(image_size=8, patch_size=2, num_classes=3, dim=16, heads=2, depth=2, pool="mean").eval()
    assert last_cam_layer(model, torch.rand(2, 1, 8, 8))[0] == "norm"  # the normalised output of the last block
    # a CNN keeps its usual default layer
    cnn, image = SmallCNN(input_size=16), torch.rand(1, 1, 16, 16)
    assert last_cam_layer(cnn, image) == last_spatial_layer(cnn, image)


def test_gradcam_of_a_mean_pooled_vit_at_its_default_layer_is_cam():
    # logits = W mean_j(norm(t_j)) + b: every patch gets the gradient W_c / N, so Grad-CAM's channel weights equal
    # HiResCAM's per-patch ones and both are CAM (Zhou et al. 2016): the patch's own logit contribution W_c . norm(t_j)
    torch.manual_seed(0)
    model = TinyViT(image_size=8, patch_size=2, num_classes=3, dim=16, heads=2, depth=2, pool="mean").eval()
    x, target = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2])
    tokens, _ = layer_output_and_grad(model, "norm", x, target)
    cam = torch.einsum("bnd,bd->bn", tokens[:, 1:], model.head.weight[target].detach()) / 16
    expected = cam.clamp(min=0).view(3, 1, 4, 4)
    grad_cam = GradCAM(model, upsample=False, relu=False)
    assert torch.allclose(grad_cam.attribute(x, target=target), cam.view(3, 1, 4, 4), atol=1e-6)
    assert grad_cam.layer_name == "norm"
    assert torch.allclose(GradCAM(model, upsample=False).attribute(x, target=target), expected, atol=1e-6)
    assert torch.allclose(HiResCAM(model, upsample=False).attribute(x, target=target), expected, atol=1e-6)
    assert expected.sum() > 0
    # the head reads the mean of the patch tokens ([CLS] excluded): the patch contributions add up to the logit
    with torch.no_grad():
        logits = model(x).gather(1, target[:, None])[:, 0]
    assert torch.allclose(cam.sum(1) + model.head.bias[target].detach(), logits, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        TinyViT(pool="max")


class SequenceFirst(nn.Module):
    """Tokens (N, B, D) as in nn.TransformerEncoderLayer(batch_first=False); 2 prefix tokens, a 2 x 3 grid."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 4, 2, stride=2)
        self.prefix = nn.Parameter(torch.randn(2, 1, 4))
        self.block = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)  # (6, B, 4)
        tokens = torch.cat([self.prefix.expand(-1, x.shape[0], -1), tokens], dim=0)
        return self.head(self.block(tokens).mean(0))


def test_explicit_grid_prefix_and_sequence_first_tokens():
    torch.manual_seed(0)
    model = SequenceFirst().eval()
    x = torch.rand(2, 1, 4, 6)
    cam = GradCAM(model, layer="block", token_grid=(2, 3), prefix_tokens=2, upsample=False).attribute(x, target=1)
    tokens, grads = layer_output_and_grad(model, "block", x, torch.tensor([1, 1]))
    tokens, grads = tokens.transpose(0, 1)[:, 2:], grads.transpose(0, 1)[:, 2:]  # (B, 6, D) patches
    expected = (grads.mean(1, keepdim=True) * tokens).sum(-1).clamp(min=0).view(2, 1, 2, 3)
    assert torch.allclose(cam, expected, atol=1e-6)
    # 8 tokens are not a square grid with 0 or 1 prefix tokens: a clear error naming the arguments
    with pytest.raises(ValueError, match=r"token_grid=\(h, w\) and prefix_tokens="):
        GradCAM(model, layer="block").attribute(x)


def test_grid_arguments_are_validated():
    with pytest.raises(TypeError, match="token_grid"):
        GradCAM(nn.Linear(2, 2), token_grid=4)
    with pytest.raises(ValueError, match="token_grid"):
        GradCAM(nn.Linear(2, 2), token_grid=(4, 0))
    with pytest.raises(ValueError, match="prefix_tokens"):
        GradCAM(nn.Linear(2, 2), prefix_tokens=-1)
    with pytest.raises(ValueError, match="do not fit 17 tokens"):
        grid_shape(17, token_grid=(4, 4), prefix_tokens=2)


def test_cascade_finds_the_vit_stages(vit):
    layers, skipped = find_layers(vit, torch.rand(1, 1, 8, 8))
    names = [layer.name for layer in layers]
    assert names[:2] == ["<root>", "patch_embed"]  # [CLS] and position embeddings form the input-side layer
    params = {n for layer in layers for n, _ in layer.parameters}
    assert {"cls_token", "pos_embed", "encoder.layers.1.self_attn.in_proj_weight",
            "encoder.layers.1.self_attn.out_proj.weight", "head.weight"} <= params
    assert params == {n for n, _ in vit.named_parameters()} and not skipped


# ------------------------------------------------------------------------------- a tiny ViT trained with the shortcut
@pytest.fixture(scope="module")
def shortcut_vit():
    """TinyViT (32 x 32, 4 x 4 patches) trained 4 epochs on 640 SpuriousDigits images that all carry the square at
    their class's position (about 15 s on one core), and 64 test images with the square at the class position."""
    from lightning_lens.datasets import SpuriousDigits

    train = SpuriousDigits("train", seed=0, train_shortcut_fraction=1.0)
    x, y = train.images[:640], train.labels[:640]
    model = fit_vit(x, y, seed=0, epochs=4)
    consistent = SpuriousDigits("test", seed=0, eval_shortcut_fraction=1.0, eval_shortcut_mode="consistent")
    conflicting = SpuriousDigits("test", seed=0, eval_shortcut_fraction=1.0, eval_shortcut_mode="conflicting")
    with torch.no_grad():
        accuracy = (model(consistent.images[:64]).argmax(1) == consistent.labels[:64]).float().mean()
        misled = (model(conflicting.images[:64]).argmax(1) == conflicting.labels[:64]).float().mean()
    # the model relies on the square: right with it, mostly wrong when it points to another class
    assert accuracy >= 0.8 and misled <= 0.4, (accuracy, misled)
    return model, consistent.images[:64], consistent.labels[:64], consistent.square_masks[:64]


def square_mass(maps, squares):
    """Mean fraction of the (positive) relevance inside the square, divided by its share of the image (chance)."""
    maps = maps.clamp(min=0)
    inside = (maps * squares).sum((1, 2, 3)) / maps.sum((1, 2, 3)).clamp(min=1e-12)
    return float(inside.mean() / squares.mean())


def test_token_grid_cams_on_the_trained_vit_find_the_square(shortcut_vit):
    """HiResCAM on the tokens finds the square; Grad-CAM on the tokens does not, and this is measured, not a defect.

    Measured (mass on the square / chance; seeds 0-3, both heads, 4-16 epochs in the issue-13 note): on
    SpuriousDigits with the digits the ViT uses both cues (accuracy with the square absent 0.2-0.65, chance 0.1) and
    token-grid Grad-CAM is 0.7x-2.6x at its default layer for both heads (8 and 16 epochs), also when the [CLS] model
    follows a moved square on 74-92 % of images (seeds 0, 2, 3); no token layer is above 2x on all four seeds (the
    best cells, 4x-6x, are single seeds). This model: 0.4x at ``encoder.layers.1.norm1``.
    Two explanations were tested and do not hold alone: per-image reliance (images the model decides by the square
    get the same mass as the others) and the square's pixels being the same for every class (a class-specific
    pattern in the square gives the same 0.6x-1.5x). A likely reason, only partly supported: unlike a CNN's sparse
    post-ReLU maps, the tokens are dense (LayerNorm'd, with position embeddings), so ``alpha . A`` is non-zero at
    every patch and one channel weighting averaged over all patches spreads the map over them (the offset shared by
    all patches is 30-98 % of the map; removing it helps on images reduced to the square, not on the digits).
    HiResCAM keeps the gradient's position (at the last attention's input, the attention [CLS] pays each patch).
    Against a model trained without the square, Grad-CAM's mass does not move while HiResCAM's does: see the
    controlled test at the end of this file.
    """
    model, x, y, squares = shortcut_vit
    hires = HiResCAM(model, layer="encoder.layers.0.norm1").attribute(x, target=y)
    assert hires.shape == (64, 1, 32, 32)
    assert square_mass(hires, squares) >= 3.0  # measured 6.1
    # Grad-CAM at the default layer: a non-negative map over the image; its square mass (0.4x here) is reported above
    # and not asserted. On this model the channel-weighted sum is negative at every patch for 35 of the 64
    # images (their map is all zero after the ReLU): another sign the averaged weights miss the evidence
    grad_cam = GradCAM(model)
    maps = grad_cam.attribute(x, target=y)
    assert grad_cam.layer_name == "encoder.layers.1.norm1"
    assert maps.shape == (64, 1, 32, 32) and float(maps.min()) >= 0 and float(maps.sum()) > 0


def test_rollouts_on_the_trained_vit(shortcut_vit):
    from lightning_lens.attribution import AttentionRollout, GradientAttentionRollout

    model, x, y, squares = shortcut_vit
    gradient = GradientAttentionRollout(model)
    assert square_mass(gradient.attribute(x, target=y), squares) >= 3.0  # measured 6.9
    raw = AttentionRollout(model)
    assert square_mass(raw.attribute(x), squares) >= 2.0  # measured 3.9
    # not class-specific: the same map whatever the target; gradient rollout changes with the target
    other = (y + 5) % 10
    assert torch.equal(raw.attribute(x, target=y), raw.attribute(x, target=other))
    a, b = gradient.attribute(x, target=y), gradient.attribute(x, target=other)
    assert float((a - b).abs().sum() / a.abs().sum()) > 0.2


def test_cascade_verdicts_for_the_rollouts(shortcut_vit):
    from lightning_lens.sanity import cascading_randomization

    model, x, _, _ = shortcut_vit
    report = cascading_randomization(model, x[:8], None, ["attention_rollout", "gradient_rollout"], controls=False,
                                     keep_maps=False)
    assert report.stages[0] == "head" and report.stages[-1] == "<root>"
    assert {"attention_rollout", "gradient_rollout"} <= set(report.verdicts)
    # the verdicts themselves are reported in the issue notes, whatever they are
    for verdict in report.verdicts.values():
        assert verdict.outcome in ("passes", "fails", "inconclusive")


# ------------------------------------------------------ issue 13's must-show: a ViT whose evidence is the square alone
def fit_vit(x, y, seed, pool="cls", epochs=8):
    """TinyViT (32 x 32, 4 x 4 patches, dim 32, 2 blocks) fitted with Adam (lr 3e-3, batches of 32), seeded."""
    torch.manual_seed(seed)
    model = TinyViT(image_size=32, patch_size=4, num_classes=10, dim=32, heads=2, depth=2, pool=pool)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), 32):
            rows = perm[i:i + 32]
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_token_grid_cams_against_a_model_trained_without_the_square(seed):
    """Issue 13's must-show, measured against a control. A [CLS]-head TinyViT fitted 8 epochs on all 1078 training
    images of SpuriousDigits with the square (the shortcut) and the same recipe without it (the control), both
    explained on the same validation images with the square at the class position. Seeds 0-3, all of them (~8 s
    each).

    Mass on the square / chance, seeds 0-3 (shortcut model | control):
    - HiResCAM on the tokens entering the first block: 9.2, 2.2, 7.7, 3.0 | 0.6, 0.4, 0.6, 0.2 (asserted below);
    - gradient rollout: 14.6, 2.5, 8.0, 7.2 | 0.7, 0.4, 0.9, 0.3;
    - Grad-CAM at its default layer ``encoder.layers.1.norm1``: 2.6, 0.9, 1.0, 1.7 | 1.0, 1.1, 1.9, 1.3; at the
      patch embedding: 2.9, 2.0, 2.9, 2.5 | 3.1, 2.1, 4.0, 2.3 (the brightest patches, whatever the model learned).
    Token-grid Grad-CAM does not tell the shortcut model from the control, so its "several times chance" cannot be
    asserted honestly; HiResCAM on the same token grid can (the weakest seed, 1, is also the one that relies least
    on the square). Also measured, and why no test asserts Grad-CAM on images reduced to the square alone: there
    an untrained TinyViT's Grad-CAM already puts 1.1x-8.8x chance on the square (the only non-blank patch).
    """
    from lightning_lens.datasets import SpuriousDigits

    val = SpuriousDigits("val", seed=seed, eval_shortcut_fraction=1.0, eval_shortcut_mode="consistent")
    conflicting = SpuriousDigits("val", seed=seed, eval_shortcut_fraction=1.0, eval_shortcut_mode="conflicting")
    moved_to = torch.from_numpy(conflicting.metadata["shortcut_position"])
    hires, follows = {}, {}
    for kind, fraction in (("shortcut", 1.0), ("control", 0.0)):
        train = SpuriousDigits("train", seed=seed, train_shortcut_fraction=fraction)
        model = fit_vit(train.images, train.labels, seed)
        with torch.no_grad():
            follows[kind] = float((model(conflicting.images).argmax(1) == moved_to).float().mean())
        maps = HiResCAM(model, layer="encoder.layers.0.norm1").attribute(val.images, target=val.labels)
        hires[kind] = square_mass(maps, val.square_masks)
        grad_cam = GradCAM(model)
        assert grad_cam.attribute(val.images[:8], target=val.labels[:8]).shape == (8, 1, 32, 32)
        assert grad_cam.layer_name == "encoder.layers.1.norm1"
    # the shortcut model uses the square: moved to another class's position, it takes the prediction with it
    assert follows["shortcut"] >= 0.25 and follows["control"] <= 0.1, follows  # measured 0.35-0.79 and 0.01-0.03
    assert hires["shortcut"] >= 1.5, hires  # measured 9.2, 2.2, 7.7, 3.0
    assert hires["shortcut"] >= 3 * hires["control"], hires  # measured ratios 15, 5.5, 13, 13
