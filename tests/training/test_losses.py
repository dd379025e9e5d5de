"""Partial cross-entropy: only seed pixels count, ignore is ignored, an empty batch gives a usable zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses import partial_ce
from training.pseudo_labels import IGNORE_INDEX


def test_mean_over_labelled_pixels_of_the_whole_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 5, 5)
    seeds = torch.full((2, 5, 5), IGNORE_INDEX)
    seeds[0, 1, 1], seeds[0, 2, 3], seeds[1, 4, 4] = 1, 0, 1
    logp = F.log_softmax(logits, dim=1)
    expected = -(logp[0, 1, 1, 1] + logp[0, 0, 2, 3] + logp[1, 1, 4, 4]) / 3
    torch.testing.assert_close(partial_ce(logits, seeds), expected)


def test_ignored_pixels_get_no_gradient_and_do_not_change_the_loss() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    seeds = torch.full((1, 4, 4), IGNORE_INDEX)
    seeds[0, 0, 0] = 1
    loss = partial_ce(logits, seeds)
    loss.backward()
    assert logits.grad is not None
    grad = logits.grad[0].abs().sum(dim=0)
    assert grad[0, 0] > 0 and grad.sum() == grad[0, 0]
    other = logits.detach().clone()
    other[:, :, 1:, 1:] += 10.0
    torch.testing.assert_close(partial_ce(other, seeds), loss.detach())


def test_logits_upsampled_to_seed_resolution() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 3.0  # fg everywhere
    seeds = torch.full((1, 16, 16), IGNORE_INDEX)
    seeds[0, 5, 9] = 1
    loss = partial_ce(logits, seeds)
    torch.testing.assert_close(loss, -F.log_softmax(torch.tensor([0.0, 3.0]), dim=0)[1])


def test_batch_without_seeds_gives_zero_with_a_graph() -> None:
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    seeds = torch.full((2, 3, 3), IGNORE_INDEX)
    loss = partial_ce(logits, seeds)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_seed_classes_excludes_other_images_from_the_pixel_loss() -> None:
    from training.config import make_config
    from training.train import pixel_loss

    torch.manual_seed(2)
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    cams = torch.rand(2, 16, 16)
    labels = torch.tensor([0, 1])
    cfg = make_config({"seed_classes": ("malignant",)})
    pixel_loss(logits, cams, labels, cfg, torch.Generator().manual_seed(0)).backward()
    assert logits.grad is not None
    assert float(logits.grad[0].abs().sum()) == 0.0 and float(logits.grad[1].abs().sum()) > 0
    every = make_config({})
    logits.grad = None
    pixel_loss(logits, cams, labels, every, torch.Generator().manual_seed(0)).backward()
    assert float(logits.grad[0].abs().sum()) > 0


def test_low_res_seeds_at_feature_resolution() -> None:
    from training.config import make_config
    from training.train import pixel_loss

    torch.manual_seed(3)
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    cams = torch.zeros(2, 32, 32)
    cams[:, :16, :16] = 1.0  # the top-left quarter is hot
    cfg = make_config({"low_res": True, "n_fg": 2, "n_bg": 2})
    loss = pixel_loss(logits, cams, torch.tensor([0, 1]), cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert logits.grad is not None
    touched = logits.grad.abs().sum(dim=1) > 0  # (2, 4, 4): exactly the seed cells of the 4x4 map
    assert int(touched.sum()) == 8
    assert bool(touched[:, :2, :2].sum() == 4)  # the fg seeds sit in the hot quarter
