"""Generic procedural scenes: deterministic, boxes and areas true to the label map, pairs move together."""

import numpy as np

from rau_ray.data.scenes import KINDS, TONES, make_scene, random_affine, render, scene_rng


def test_same_seed_same_scene_and_boxes_match_the_label_map():
    a, b = make_scene(3, 11, size=96), make_scene(3, 11, size=96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.image, make_scene(3, 12, size=96).image)
    assert a.image.dtype == np.uint8 and a.image.shape == (96, 96) and a.shapes
    for s in a.shapes:
        rows, cols = np.nonzero(a.label == s.label)
        assert s.box == (cols.min(), rows.min(), cols.max(), rows.max()) and s.area == len(rows)
        assert s.kind in KINDS and s.tone in TONES and s.name == f"{s.tone} {s.kind}"
    assert set(np.unique(a.label)) - {0} == {s.label for s in a.shapes}


def test_tones_are_visible_in_the_pixels():
    means = {t: [] for t in TONES}
    for i in range(40):
        scene = make_scene(0, i, size=64)
        for s in scene.shapes:
            means[s.tone].append(scene.image[scene.label == s.label].mean())
    assert np.mean(means["dark"]) + 40 < np.mean(means["grey"]) < np.mean(means["bright"]) - 40


def test_an_affine_moves_every_shape_the_same_way():
    scene = make_scene(1, 5, size=128)
    shift = np.array([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]])  # 0.1 of the side to the right
    moved = render(scene.spec, size=128, affine=shift)
    for s in scene.shapes:
        twin = [m for m in moved.shapes if (m.kind, m.tone) == (s.kind, s.tone)]
        if len(twin) == 1 and s.box[2] < 110 and twin[0].box[0] > 0:  # not clipped by the border
            assert abs((twin[0].box[0] - s.box[0]) - 12.8) <= 2
    a = random_affine(scene_rng(0, 0))
    assert a.shape == (2, 3) and 0.8 < abs(np.linalg.det(a[:, :2])) ** 0.5 < 1.2
