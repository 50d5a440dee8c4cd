"""Loss values against closed-form numbers (and torchvision for the sigmoid focal loss)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from d2seg.modeling.losses import (
    SemSegLoss,
    cross_entropy_loss,
    focal_loss,
    soft_dice_loss,
    tversky_loss,
)

# Four pixels (one image, 2x2): foreground probabilities and binary targets.
P = [0.8, 0.2, 0.6, 0.4]
Y = [1, 0, 1, 1]
# TP = 0.8 + 0.6 + 0.4 = 1.8, FP = 0.2, FN = 0.2 + 0.4 + 0.6 = 1.2 (class 1)
# class 0: TP = 0.8, FP = 1.2, FN = 0.2


def _logit(p):
    return math.log(p / (1 - p))


def binary_logits(extra=()):
    return torch.tensor([_logit(p) for p in P + list(extra)]).view(1, 1, 1, -1)


def two_class_logits(extra=()):
    z = binary_logits(extra)
    return torch.cat([torch.zeros_like(z), z], dim=1)  # softmax class 1 = sigmoid(z)


def targets(extra=()):
    return torch.tensor(Y + list(extra)).view(1, 1, -1)


def test_dice_binary_closed_form():
    assert soft_dice_loss(binary_logits(), targets(), smooth=0.0).item() == pytest.approx(
        1 - 3.6 / 5.0, abs=1e-6)
    assert soft_dice_loss(binary_logits(), targets(), smooth=1.0).item() == pytest.approx(
        1 - 4.6 / 6.0, abs=1e-6)


def test_dice_multiclass_closed_form_and_ignore():
    expected = 1 - (1.6 / 3.0 + 3.6 / 5.0) / 2
    assert soft_dice_loss(two_class_logits(), targets(), smooth=0.0).item() == pytest.approx(
        expected, abs=1e-6)
    # an ignored pixel with any score changes nothing
    got = soft_dice_loss(two_class_logits([0.99]), targets([255]), smooth=0.0, ignore_index=255)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # only class 1
    got = soft_dice_loss(two_class_logits(), targets(), smooth=0.0, classes=[1])
    assert got.item() == pytest.approx(1 - 3.6 / 5.0, abs=1e-6)


def test_dice_perfect_and_absent_class():
    t = torch.tensor([[[0, 1], [1, 0]]])
    logits = F.one_hot(t, 3).permute(0, 3, 1, 2).float() * 50  # class 2 absent everywhere
    # smoothed: the absent class scores ~1, so a perfect prediction has ~0 loss
    assert soft_dice_loss(logits, t, smooth=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # unsmoothed: the absent class gets ~1e-22 probability mass, so its Dice is 0 / tiny = 0
    assert soft_dice_loss(logits, t, smooth=0.0).item() == pytest.approx(1 / 3, abs=1e-6)
    # ... unless it is scored only where it occurs
    assert soft_dice_loss(logits, t, smooth=0.0, classes=[0, 1]).item() == pytest.approx(
        0.0, abs=1e-6)


def test_tversky_closed_form_and_dice_equivalence():
    got = tversky_loss(binary_logits(), targets(), alpha=0.3, beta=0.7, smooth=0.0)
    assert got.item() == pytest.approx(1 - 1.8 / (1.8 + 0.3 * 0.2 + 0.7 * 1.2), abs=1e-6)
    torch.manual_seed(0)
    logits, t = torch.randn(2, 4, 5, 7), torch.randint(0, 4, (2, 5, 7))
    t[0, 0, :3] = 255
    for t_smooth, d_smooth in ((0.0, 0.0), (0.5, 1.0)):  # (TP+s)/(TP+FP/2+FN/2+s) = Dice(2s)
        a = tversky_loss(logits, t, alpha=0.5, beta=0.5, smooth=t_smooth)
        b = soft_dice_loss(logits, t, smooth=d_smooth)
        assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_sigmoid_focal_matches_torchvision_and_closed_form():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 5)
    y = torch.randint(0, 2, (2, 6, 5))
    y[1, :2] = 255
    valid = y != 255
    for alpha, gamma in ((0.25, 2.0), (None, 2.0), (0.6, 0.5)):
        ref = sigmoid_focal_loss(x[:, 0][valid], (y[valid] == 1).float(),
                                 alpha=-1 if alpha is None else alpha, gamma=gamma,
                                 reduction="mean")
        got = focal_loss(x, y, gamma=gamma, alpha=alpha)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # closed form on the four pixels: -alpha_t (1 - p_t)^gamma log p_t
    terms = []
    for p, t in zip(P, Y):
        pt, at = (p, 0.25) if t == 1 else (1 - p, 0.75)
        terms.append(-at * (1 - pt) ** 2 * math.log(pt))
    got = focal_loss(binary_logits(), targets(), gamma=2.0, alpha=0.25)
    assert got.item() == pytest.approx(sum(terms) / 4, rel=1e-5)


def test_softmax_focal_closed_form():
    # pixel probabilities for the true class: 0.8, 0.8, 0.6, 0.4 (two-class logits)
    got = focal_loss(two_class_logits(), targets(), gamma=2.0, alpha=None)
    pts = [0.8, 0.8, 0.6, 0.4]
    assert got.item() == pytest.approx(
        sum(-(1 - p) ** 2 * math.log(p) for p in pts) / 4, rel=1e-5)
    # one alpha with two classes weighs the foreground by it, the background by 1 - alpha
    # (targets 1, 0, 1, 1), as the binary loss does; with more classes it scales every class
    got = focal_loss(two_class_logits(), targets(), gamma=2.0, alpha=0.25)
    assert got.item() == pytest.approx(sum(
        -a * (1 - p) ** 2 * math.log(p) for a, p in zip([0.25, 0.75, 0.25, 0.25], pts)) / 4,
        rel=1e-5)
    assert got.item() == focal_loss(two_class_logits(), targets(), gamma=2.0,
                                    alpha=[0.75, 0.25]).item()
    assert got.item() == focal_loss(two_class_logits(), targets(), gamma=2.0,
                                    alpha=[0.25]).item()  # a list of one: the same
    assert focal_loss(two_class_logits(), targets(), alpha=-1.0).item() == \
        focal_loss(two_class_logits(), targets()).item()  # < 0: no weighting
    torch.manual_seed(2)
    logits3, t3 = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert focal_loss(logits3, t3, alpha=0.25).item() == pytest.approx(
        0.25 * focal_loss(logits3, t3).item(), rel=1e-6)
    assert focal_loss(logits3, t3, alpha=-1.0).item() == focal_loss(logits3, t3).item()
    # per-class alpha
    got = focal_loss(two_class_logits(), targets(), gamma=2.0, alpha=[0.3, 0.7])
    w = [0.7, 0.3, 0.7, 0.7]
    assert got.item() == pytest.approx(
        sum(-a * (1 - p) ** 2 * math.log(p) for a, p in zip(w, pts)) / 4, rel=1e-5)
    # gamma 0 and no alpha: cross-entropy
    torch.manual_seed(1)
    logits, t = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert focal_loss(logits, t, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits, t).item(), rel=1e-5)


def test_class_weighted_ce_closed_form():
    pts = {0: [0.8], 1: [0.8, 0.6, 0.4]}  # true-class probabilities by class
    w = [1.0, 3.0]
    num = sum(w[c] * -math.log(p) for c, ps in pts.items() for p in ps)
    den = w[0] * 1 + w[1] * 3
    got = cross_entropy_loss(two_class_logits([0.3]), targets([255]), class_weights=w)
    assert got.item() == pytest.approx(num / den, rel=1e-5)
    got = cross_entropy_loss(binary_logits([0.3]), targets([255]), class_weights=w)
    assert got.item() == pytest.approx(num / den, rel=1e-5)  # BCE with per-pixel weights
    got = cross_entropy_loss(binary_logits(), targets())
    assert got.item() == pytest.approx(
        sum(-math.log(p) for ps in pts.values() for p in ps) / 4, rel=1e-5)


def test_all_ignored_gives_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    t = torch.full((1, 4, 4), 255)
    loss = SemSegLoss(names=["CE", "Dice", "Focal", "Tversky"], ignore_index=255)
    out = loss(logits, t)
    total = sum(out.values())
    assert torch.isfinite(total)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert out["loss_sem_seg_ce"].item() == 0.0 and out["loss_sem_seg_focal"].item() == 0.0


def test_sem_seg_loss_combination_and_weights():
    torch.manual_seed(0)
    logits, t = torch.randn(2, 3, 5, 5, requires_grad=True), torch.randint(0, 3, (2, 5, 5))
    loss = SemSegLoss(names=["CE", "Dice"], weights=[1.0, 0.5], loss_weight=2.0)
    out = loss(logits, t)
    assert set(out) == {"loss_sem_seg_ce", "loss_sem_seg_dice"}
    assert out["loss_sem_seg_ce"].item() == pytest.approx(
        2.0 * F.cross_entropy(logits, t).item(), rel=1e-5)
    assert out["loss_sem_seg_dice"].item() == pytest.approx(
        1.0 * soft_dice_loss(logits, t).item(), rel=1e-5)
    sum(out.values()).backward()
    assert logits.grad.abs().sum() > 0
    # binary: BCE + Dice
    b = SemSegLoss(names=["BCE", "Dice"])
    out = b(torch.randn(2, 1, 5, 5), torch.randint(0, 2, (2, 5, 5)))
    assert set(out) == {"loss_sem_seg_bce", "loss_sem_seg_dice"}


def test_sem_seg_loss_from_config():
    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_LOSS.NAMES = ["Focal", "Dice"]
    cfg.MODEL.SEM_SEG_LOSS.WEIGHTS = [2.0, 1.0]
    cfg.MODEL.SEM_SEG_LOSS.FOCAL_ALPHA = [0.25]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1
    loss = SemSegLoss(cfg)
    assert loss.names == ["Focal", "Dice"] and loss.weights == [2.0, 1.0]
    assert loss.focal_alpha == 0.25 and loss.ignore_index == 255
    # two classes (softmax over background, foreground): the same meaning as binary
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 2
    assert SemSegLoss(cfg).focal_alpha == [0.75, 0.25]
    # the default WEIGHTS ([]) weigh every name 1
    cfg.MODEL.SEM_SEG_LOSS.WEIGHTS = []
    assert SemSegLoss(cfg).weights == [1.0, 1.0]
    # every setting reaches the loss, none is a default re-read
    cfg.MODEL.SEM_SEG_LOSS.NAMES = ["Tversky", "Dice", "Focal"]
    cfg.MODEL.SEM_SEG_LOSS.WEIGHTS = [1.0, 1.0, 1.0]
    cfg.MODEL.SEM_SEG_LOSS.TVERSKY_ALPHA, cfg.MODEL.SEM_SEG_LOSS.TVERSKY_BETA = 0.2, 0.8
    cfg.MODEL.SEM_SEG_LOSS.SMOOTH, cfg.MODEL.SEM_SEG_LOSS.FOCAL_GAMMA = 0.5, 1.5
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 0
    loss = SemSegLoss(cfg)
    assert (loss.tversky_alpha, loss.tversky_beta, loss.smooth, loss.focal_gamma,
            loss.ignore_index) == (0.2, 0.8, 0.5, 1.5, 0)


def test_sem_seg_loss_forward_passes_its_settings_on():
    """SemSegLoss's own settings reach the loss functions (closed-form values, 4 pixels)."""
    out = SemSegLoss(names=["Tversky"], tversky_alpha=0.3, tversky_beta=0.7, smooth=0.0)(
        binary_logits(), targets())
    assert out["loss_sem_seg_tversky"].item() == pytest.approx(
        1 - 1.8 / (1.8 + 0.3 * 0.2 + 0.7 * 1.2), abs=1e-6)
    out = SemSegLoss(names=["Dice"], smooth=0.0)(binary_logits(), targets())
    assert out["loss_sem_seg_dice"].item() == pytest.approx(1 - 3.6 / 5.0, abs=1e-6)
    # ignore_index: pixels labelled 0 ignored, so only the three foreground pixels count
    out = SemSegLoss(names=["CE"], ignore_index=0)(two_class_logits(), targets())
    assert out["loss_sem_seg_ce"].item() == pytest.approx(
        -(math.log(0.8) + math.log(0.6) + math.log(0.4)) / 3, rel=1e-5)
    out = SemSegLoss(names=["Focal"], focal_gamma=2.0, focal_alpha=0.25)(
        two_class_logits(), targets())
    assert out["loss_sem_seg_focal"].item() == pytest.approx(sum(
        -a * (1 - p) ** 2 * math.log(p)
        for a, p in zip([0.25, 0.75, 0.25, 0.25], [0.8, 0.8, 0.6, 0.4])) / 4, rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(names=["CE", "Lovasz"]), "unknown loss 'Lovasz'"),
    (dict(names=["CE", "Dice"], weights=[1.0]), "WEIGHTS"),
    (dict(names=[]), "NAMES is empty"),
    (dict(names=["Dice", "dice"]), "duplicates"),
])
def test_sem_seg_loss_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SemSegLoss(**kwargs)


def test_bce_needs_one_channel_and_targets_checked():
    with pytest.raises(ValueError, match="'BCE' needs one output channel"):
        SemSegLoss(names=["BCE"])(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="binary .* got 2"):
        SemSegLoss(names=["CE", "Dice"])(torch.randn(1, 1, 2, 2), torch.full((1, 2, 2), 2))
    with pytest.raises(ValueError, match="target value 7"):
        soft_dice_loss(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="class weights"):
        cross_entropy_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                           class_weights=[1.0, 2.0])


@pytest.mark.parametrize("binary", [False, True])
def test_losses_read_no_value_back_off_the_cpu(binary):
    """On the meta device (shapes, no values) every loss and option runs: no ``.item()``,
    ``bool(tensor)`` or boolean-mask indexing, which would each stall a GPU."""
    c = 1 if binary else 3
    logits = torch.empty(2, c, 8, 8, device="meta", requires_grad=True)
    t = torch.empty(2, 8, 8, dtype=torch.long, device="meta")
    cw = [1.0, 2.0] if binary else [1.0, 2.0, 0.5]
    alpha = 0.25 if binary else [0.2, 0.3, 0.5]
    outs = [cross_entropy_loss(logits, t), cross_entropy_loss(logits, t, class_weights=cw),
            soft_dice_loss(logits, t), tversky_loss(logits, t), focal_loss(logits, t),
            focal_loss(logits, t, alpha=alpha)]
    names = ["BCE" if binary else "CE", "Dice", "Focal", "Tversky"]
    outs += list(SemSegLoss(names=names, class_weights=cw)(logits, t).values())
    sum(outs).backward()
    assert all(o.device.type == "meta" and o.dim() == 0 for o in outs)


def test_check_targets_names_the_bad_value():
    from d2seg.modeling.losses import check_targets

    check_targets(torch.tensor([[0, 2, 255]]), 3, 255)
    with pytest.raises(ValueError, match="target value 3 is outside"):
        check_targets(torch.tensor([[0, 3, 255]]), 3, 255)
    with pytest.raises(ValueError, match="binary .* got 2"):
        check_targets(torch.tensor([[0, 1, 2]]), 1, 255)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_focal_gradients_stay_finite_with_saturated_and_ignored_logits(gamma):
    """(1 - p_t) ** gamma has an infinite derivative at p_t = 1 for gamma < 1; torchvision's
    sigmoid_focal_loss then gives NaN gradients (the loss itself stays finite)."""
    x = torch.tensor([[[[0.3, 20.0, -200.0, 90.0]]]], requires_grad=True)
    y = torch.tensor([[[1, 1, 0, 255]]])
    focal_loss(x, y, gamma=gamma).backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 0, 0, 3] == 0
    xm = torch.zeros(1, 3, 1, 3)
    xm[0, 0, 0, 1] = 60.0
    xm[0, 2, 0, 2] = 1e4  # an ignored pixel's logits do not matter
    xm.requires_grad_()
    focal_loss(xm, torch.tensor([[[1, 0, 255]]]), gamma=gamma).backward()
    assert torch.isfinite(xm.grad[..., :2]).all() and (xm.grad[..., 2] == 0).all()
    # values unchanged: torchvision's definition
    z = torch.randn(2, 1, 4, 5) * 4
    t = torch.randint(0, 2, (2, 4, 5))
    ref = sigmoid_focal_loss(z[:, 0], t.float(), alpha=0.25, gamma=gamma, reduction="mean")
    assert focal_loss(z, t, gamma=gamma, alpha=0.25).item() == pytest.approx(ref.item(), rel=1e-5)


def test_ce_and_bce_together_is_an_error():
    with pytest.raises(ValueError, match="'CE' and 'BCE' are the same"):
        SemSegLoss(names=["CE", "BCE"])


@pytest.mark.parametrize("num_classes, key, value, match", [
    (3, "CLASS_WEIGHTS", [1.0, 2.0], "needs 3 values"),
    (1, "CLASS_WEIGHTS", [1.0], r"needs 2 values \(\[background, foreground\]"),
    (3, "FOCAL_ALPHA", [0.2, 0.8], "FOCAL_ALPHA"),
    (1, "FOCAL_ALPHA", [0.2, 0.8], "FOCAL_ALPHA"),
    (2, "NAMES", ["BCE", "Dice"], r"'BCE' needs one output channel .* NUM_CLASSES is 2; use "
                                  r"'CE' with 2 classes"),
])
def test_loss_list_lengths_are_checked_when_built(num_classes, key, value, match):
    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_LOSS[key] = value
    with pytest.raises(ValueError, match=match):
        SemSegLoss(cfg)


def test_psp_head_default_aux_loss_keeps_the_main_loss_settings():
    from detectron2.layers import ShapeSpec

    from d2seg.modeling.heads.psp_head import PSPHead

    shapes = {"res4": ShapeSpec(channels=8, stride=8), "res5": ShapeSpec(channels=16, stride=8)}
    main = SemSegLoss(names=["CE", "Dice"], weights=[1, 2], loss_weight=0.5,
                      class_weights=[1, 2, 3])
    head = PSPHead(shapes, in_feature="res5", aux_in_feature="res4", num_classes=3,
                   pool_channels=8, convs_dim=8, aux_convs_dim=8, loss=main)
    aux = head.aux_loss
    assert aux.names == ["CE", "Dice"] and aux.weights == [1.0, 2.0]
    assert aux.loss_weight == pytest.approx(0.2) and aux.class_weights == [1, 2, 3]
    assert aux.prefix == "loss_aux" and main.prefix == "loss_sem_seg" and main.loss_weight == 0.5
    head.train()
    feats = {"res4": torch.randn(2, 8, 4, 4), "res5": torch.randn(2, 16, 4, 4)}
    losses = head(feats, torch.randint(0, 3, (2, 32, 32)))[1]
    assert set(losses) == {"loss_sem_seg_ce", "loss_sem_seg_dice", "loss_aux_ce", "loss_aux_dice"}


def test_fpn_loss_head_builds_without_a_loss_and_applies_loss_weight():
    from detectron2.layers import ShapeSpec

    from d2seg.modeling.heads.fpn_loss_head import SemSegFPNLossHead

    shapes = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}
    feats = {"p2": torch.randn(2, 8, 8, 8), "p3": torch.randn(2, 8, 4, 4)}
    t = torch.randint(0, 3, (2, 32, 32))
    out = {}
    for lw in (1.0, 0.5):
        torch.manual_seed(0)
        head = SemSegFPNLossHead(shapes, num_classes=3, conv_dims=8, common_stride=4, norm="",
                                 loss_weight=lw, ignore_value=255).train()
        out[lw] = head(feats, t)[1]["loss_sem_seg_ce"].item()
        assert head.loss.ignore_index == 255
    assert out[0.5] == pytest.approx(out[1.0] / 2)


def test_check_targets_rejects_negative_values_and_batch_size_mismatch():
    """Negative targets (not the ignore value) and a batch-size mismatch raise ValueError."""
    from d2seg.modeling.losses import check_targets

    with pytest.raises(ValueError, match="target value -1 is outside"):
        check_targets(torch.tensor([[0, -1, 255]]), 3, 255)
    with pytest.raises(ValueError, match="got -1"):
        check_targets(torch.tensor([[0, -1]]), 1, 255)
    with pytest.raises(ValueError, match="do not match"):
        soft_dice_loss(torch.zeros(2, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_dice_without_smoothing_scores_an_exact_empty_class_one():
    """smooth=0: a class with no true and exactly no predicted pixel has Dice 1 (loss 0)."""
    logits = torch.full((1, 1, 2, 2), -200.0)  # sigmoid underflows to exactly 0
    t = torch.zeros(1, 2, 2, dtype=torch.long)
    assert soft_dice_loss(logits, t, smooth=0.0).item() == 0.0
    assert tversky_loss(logits, t, smooth=0.0).item() == 0.0


def test_tversky_rejects_negative_beta():
    """A negative Tversky beta raises like a negative alpha."""
    with pytest.raises(ValueError, match="beta=-0.1"):
        tversky_loss(two_class_logits(), targets(), alpha=0.3, beta=-0.1)


def test_binary_focal_ignores_infinite_logits_and_negative_alpha():
    """Binary focal: an ignored pixel's infinite logit changes nothing; alpha < 0 = no alpha."""
    ref = focal_loss(binary_logits(), targets(), gamma=2.0)
    x = binary_logits([float("inf")]).requires_grad_()
    got = focal_loss(x, targets([255]), gamma=2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    got.backward()
    assert torch.isfinite(x.grad).all()
    assert focal_loss(binary_logits(), targets(), gamma=2.0, alpha=-1.0).item() == \
        pytest.approx(ref.item(), rel=1e-6)


def test_softmax_focal_per_class_alpha_follows_each_image_target():
    """Per-class alpha weighs each pixel by its own image's target class (batch of 2)."""
    logits = torch.cat([two_class_logits(), 3 * two_class_logits()], 0)
    t = torch.stack([targets()[0], 1 - targets()[0]])
    alpha = [0.3, 0.7]
    got = focal_loss(logits, t, gamma=0.0, alpha=alpha)
    logp = F.log_softmax(logits, 1).gather(1, t[:, None])[:, 0]
    w = torch.tensor(alpha)[t]
    assert got.item() == pytest.approx((-(w * logp)).mean().item(), rel=1e-5)


def test_cross_entropy_rejects_too_many_class_weights():
    """More class weights than classes is an error, not silently truncated."""
    with pytest.raises(ValueError, match="3 class weights for 2 classes"):
        cross_entropy_loss(two_class_logits(), targets(), class_weights=[1.0, 2.0, 3.0])


def test_two_class_focal_alpha_from_the_config_weighs_the_foreground_as_binary_does():
    """FOCAL_ALPHA [a] means the foreground's weight whether the problem is one sigmoid
    channel (NUM_CLASSES 1) or a softmax over [background, foreground] (NUM_CLASSES 2): at
    gamma 0 both give alpha-weighted cross-entropy of the same probabilities."""
    from d2seg.config import get_cfg

    torch.manual_seed(0)
    z = torch.randn(2, 1, 6, 6)
    t = torch.randint(0, 2, (2, 6, 6))
    t[0, 0] = 255
    losses = []
    for k, logits in ((1, z), (2, torch.cat([torch.zeros_like(z), z], 1))):
        cfg = get_cfg()
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = k
        cfg.MODEL.SEM_SEG_LOSS.NAMES = ["Focal"]
        cfg.MODEL.SEM_SEG_LOSS.FOCAL_GAMMA = 0.0
        cfg.MODEL.SEM_SEG_LOSS.FOCAL_ALPHA = [0.9]
        losses.append(SemSegLoss(cfg)(logits, t)["loss_sem_seg_focal"])
        # built without a config, one alpha means the same (it scaled both classes alike)
        direct = SemSegLoss(names=["Focal"], focal_gamma=0.0, focal_alpha=0.9)(logits, t)
        assert torch.allclose(direct["loss_sem_seg_focal"], losses[-1], atol=1e-6)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_head_and_loss_must_ignore_the_same_value(caplog):
    from detectron2.layers import ShapeSpec

    from d2seg.modeling.heads.unet_head import UNetHead

    shape = {"s1": ShapeSpec(channels=8, stride=1), "s2": ShapeSpec(channels=8, stride=2)}
    with pytest.raises(ValueError, match=r"ignore_value 100 .* differs from its loss's "
                                         r"ignore_index 255"):
        UNetHead(shape, num_classes=3, ignore_value=100, loss=SemSegLoss(names=["CE", "Dice"]))
    with caplog.at_level("WARNING"):
        UNetHead(shape, num_classes=3, ignore_value=0)
    assert "IGNORE_VALUE 0 is a class id (NUM_CLASSES 3): class 0 is never trained" in caplog.text


def test_one_focal_alpha_with_more_than_two_classes_scales_every_class_and_warns(caplog):
    """As before (a config a model was trained with still loads for inference), with a warning
    that one value does not weigh the classes."""
    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_LOSS.FOCAL_ALPHA = [0.4]
    with caplog.at_level("WARNING"):
        loss = SemSegLoss(cfg)
    assert loss.focal_alpha == 0.4
    assert "FOCAL_ALPHA [0.4] with 3 classes scales every class's focal term alike" in caplog.text


def test_loss_settings_no_named_loss_uses_are_a_warning(caplog):
    """CLASS_WEIGHTS with only Focal + Dice trained unweighted without a word."""
    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_LOSS.NAMES = ["Focal", "Dice"]
    cfg.MODEL.SEM_SEG_LOSS.CLASS_WEIGHTS = [1.0, 50.0, 50.0]
    cfg.MODEL.SEM_SEG_LOSS.TVERSKY_BETA = 0.9
    with caplog.at_level("WARNING"):
        SemSegLoss(cfg)
    assert "CLASS_WEIGHTS [1.0, 50.0, 50.0] has no effect: no loss in MODEL.SEM_SEG_LOSS.NAMES " \
           "['Focal', 'Dice'] uses it" in caplog.text
    assert "TVERSKY_ALPHA / TVERSKY_BETA [0.3, 0.9] has no effect" in caplog.text
    caplog.clear()
    cfg.MODEL.SEM_SEG_LOSS.NAMES = ["CE", "Tversky"]
    cfg.MODEL.SEM_SEG_LOSS.FOCAL_ALPHA = []
    with caplog.at_level("WARNING"):
        SemSegLoss(cfg)
    assert "has no effect" not in caplog.text


def test_targets_with_a_channel_dimension_give_the_same_loss():
    """segmentation_models_pytorch passes binary masks as (N, 1, H, W): the region losses
    broadcast that against the probabilities and mixed the images (a wrong value, no error)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 4, 4))
    for fn in (soft_dice_loss, tversky_loss, focal_loss, cross_entropy_loss):
        assert torch.equal(fn(x, y.unsqueeze(1)), fn(x, y)), fn.__name__
    x3, y3 = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert torch.equal(soft_dice_loss(x3, y3.unsqueeze(1)), soft_dice_loss(x3, y3))
    with pytest.raises(ValueError, match=r"targets of shape \(2, 2, 4, 4\) .* targets are "
                                         r"\(N, H, W\) \(or \(N, 1, H, W\)\)"):
        soft_dice_loss(x3, y3[:, None].expand(2, 2, 4, 4))


@pytest.mark.parametrize("binary", [False, True])
def test_hard_pixel_mining_averages_the_hardest_pixels(binary):
    """top_k: detectron2's DeepLabCE's int(top_k * pixels) hardest pixels, ignored ones never
    among them; top_k 1 is the plain (weighted) mean."""
    torch.manual_seed(1)
    x = torch.randn(2, 1 if binary else 3, 5, 4)
    y = torch.randint(0, 2 if binary else 3, (2, 5, 4))
    y[0, 0, :3] = 255
    valid = y != 255
    safe = torch.where(valid, y, torch.zeros_like(y))
    if binary:
        px = F.binary_cross_entropy_with_logits(x[:, 0], safe.float(), reduction="none")
    else:
        px = F.cross_entropy(x, safe, reduction="none")
    k = int(0.25 * y.numel())  # 10 of 40 pixels
    want = px[valid].topk(k).values.mean()
    assert torch.allclose(cross_entropy_loss(x, y, top_k=0.25), want)
    assert torch.allclose(cross_entropy_loss(x, y, top_k=1.0), px[valid].mean())
    # fewer valid pixels than k: all valid ones, never an ignored one
    y_few = torch.full_like(y, 255)
    y_few[1, 2, :2] = 1
    if binary:
        px_few = F.binary_cross_entropy_with_logits(x[1, 0, 2, :2], torch.ones(2),
                                                    reduction="none")
    else:
        px_few = F.cross_entropy(x[1:2, :, 2, :2], torch.ones(1, 2, dtype=torch.long),
                                 reduction="none")
    assert torch.allclose(cross_entropy_loss(x, y_few, top_k=0.5), px_few.mean())
    with pytest.raises(ValueError, match=r"LOSS_TOP_K\) must be in \(0, 1\], got 0"):
        cross_entropy_loss(x, y, top_k=0)


def test_hard_pixel_mining_from_detectron2s_deeplab_key(caplog):
    """MODEL.SEM_SEG_HEAD.LOSS_TYPE "hard_pixel_mining" (detectron2's DeepLab default) was
    silently ignored by d2seg's models; now CE uses the LOSS_TOP_K hardest pixels, an unknown
    type is an error, and the type with no CE/BCE named warns."""
    from d2seg.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    assert SemSegLoss(cfg).top_k == 1.0
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "hard_pixel_mining"
    loss = SemSegLoss(cfg)
    assert loss.top_k == 0.2 and "hardest 0.2 of pixels" in repr(loss)
    torch.manual_seed(0)
    x, y = torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 8, 8))
    assert torch.equal(loss(x, y)["loss_sem_seg_ce"], cross_entropy_loss(x, y, top_k=0.2))
    cfg.MODEL.SEM_SEG_LOSS.NAMES = ["Dice"]
    with caplog.at_level("WARNING"):
        SemSegLoss(cfg)
    assert "MODEL.SEM_SEG_HEAD.LOSS_TYPE ['hard_pixel_mining'] has no effect" in caplog.text
    cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE = "ohem"
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.LOSS_TYPE 'ohem'"):
        SemSegLoss(cfg)


def test_sem_seg_loss_takes_one_name_and_one_weight_unlisted():
    loss = SemSegLoss(names="Dice", weights=0.5)
    assert loss.names == ["Dice"] and loss.weights == [0.5]
