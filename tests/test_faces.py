"""The portraits drawn by code (ray_unlearn/faces.py), the face demo model's training data."""

import torch

from ray_unlearn.faces import portraits


def test_portraits_are_rgb_images_in_range_and_reproducible_from_the_generator():
    a = portraits(6, 32, torch.Generator().manual_seed(3))
    b = portraits(6, 32, torch.Generator().manual_seed(3))
    c = portraits(6, 32, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_every_draw_is_a_different_identity_with_a_face_in_the_middle():
    x = portraits(16, 32, torch.Generator().manual_seed(0))
    flat = x.flatten(1)
    d = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert float(d.min()) > 1.0  # no two draws are (nearly) the same picture
    # the centre (the face) differs from the corners (the background) in every portrait
    centre = x[:, :, 12:20, 12:20].mean(dim=(2, 3))
    corner = x[:, :, :4, :4].mean(dim=(2, 3))
    assert bool(((centre - corner).abs().sum(1) > 0.02).all())


def test_resolution_is_a_parameter_and_the_drawing_does_not_depend_on_it():
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    small, large = portraits(2, 32, g()), portraits(2, 64, g())
    assert large.shape[-1] == 64
    down = torch.nn.functional.avg_pool2d(large, 2)
    assert float((down - small).abs().mean()) < 0.02  # the same portraits, only finer
