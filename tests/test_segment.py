"""The learning-free segmenter recovers the shapes world's objects from clean, noisy and blurred images."""

import numpy as np
import pytest

from t2i.data.shapes import BACKGROUND, PALETTE, ShapeObject, ShapesConfig, render_scene
from t2i.segment import classify_shape, connected_components, match_objects, segment

CONFIG = ShapesConfig(split="all")
ATTRIBUTES = ("colour", "shape", "size", "position")


def recovery(images, scenes) -> float:
    """Share of expected objects whose colour, shape, size and position are all recovered."""
    right = total = 0
    for image, scene in zip(images, scenes):
        for expected, found in match_objects(scene.objects, segment(image)):
            total += 1
            right += found is not None and all(getattr(expected, a) == getattr(found, a) for a in ATTRIBUTES)
    return right / total


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Float (H, W, 3) image blurred by a separable Gaussian, edges extended."""
    radius = int(3 * sigma) + 1
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    kernel /= kernel.sum()
    out = np.pad(image.astype(np.float32), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    out = np.apply_along_axis(np.convolve, 0, out, kernel, "valid")
    return np.apply_along_axis(np.convolve, 1, out, kernel, "valid")


def test_recovers_ground_truth_scenes():
    scenes = [render_scene(CONFIG, i) for i in range(500)]
    accuracy = recovery([s.image for s in scenes], scenes)
    print(f"segmenter: {accuracy:.2%} of objects fully recovered on 500 clean scenes")
    assert accuracy >= 0.99
    for scene in scenes[:50]:  # on clean images each mask is exact
        for expected_mask, (_, found) in zip(scene.masks, match_objects(scene.objects, segment(scene.image))):
            assert np.array_equal(found.mask, expected_mask)


def test_recovers_objects_under_noise_and_blur():
    rng = np.random.default_rng(0)
    scenes = [render_scene(CONFIG, i) for i in range(1000, 1200)]
    noisy = [np.clip(s.image + rng.normal(0, 8, s.image.shape), 0, 255).astype(np.uint8) for s in scenes]
    blurred = [np.clip(gaussian_blur(s.image, 0.8) + rng.normal(0, 8, s.image.shape), 0, 255).astype(np.uint8)
               for s in scenes]
    accuracy_noisy, accuracy_blurred = recovery(noisy, scenes), recovery(blurred, scenes)
    print(f"segmenter: noise 8/255: {accuracy_noisy:.2%}; blur 0.8 px + noise: {accuracy_blurred:.2%}")
    assert accuracy_noisy >= 0.99 and accuracy_blurred >= 0.99


def test_blank_image_has_no_objects():
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    assert segment(blank) == []
    noisy = np.clip(blank + np.random.default_rng(0).normal(0, 8, blank.shape), 0, 255).astype(np.uint8)
    assert segment(noisy) == []


def test_components_of_one_colour_are_separate_and_matched_by_size():
    image = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    image[2:6, 2:6] = PALETTE["red"]  # small red square
    image[16:30, 16:30] = PALETTE["red"]  # large red square
    image[0, 31] = PALETTE["blue"]  # one stray pixel: dropped
    found = segment(image)
    assert [(d.colour, d.size, d.area) for d in found] == [("red", "small", 16), ("red", "large", 196)]
    red, green = (ShapeObject("square", c, "large", "bottom right", 2, 2, (16, 16, 30, 30)) for c in ("red", "green"))
    assert [(e, d.area if d else None) for e, d in match_objects([red, green], found)] == [(red, 196), (green, None)]
    labels = connected_components(np.array([[0, -1, 0], [-1, 0, -1], [1, 1, -1]]))
    assert labels.max() == 2 and labels[0, 0] == labels[1, 1] == labels[0, 2] != labels[2, 0]


def test_shape_restriction_and_input_checks():
    scene = render_scene(ShapesConfig(shapes=("diamond",), max_objects=1), 0)
    assert classify_shape(scene.masks[0], ("circle", "square")) in ("circle", "square")
    with pytest.raises(ValueError, match="uint8"):
        segment(scene.image.astype(np.float32))
    with pytest.raises(ValueError, match="valid: square, circle"):
        segment(scene.image, shapes=("star",))


def test_connected_components_agree_with_a_flood_fill():
    def flood_fill(classes):  # reference: 8-connected regions of equal class, by depth-first search
        h, w = classes.shape
        labels, count = np.zeros((h, w), dtype=int), 0
        for start in zip(*np.nonzero(classes >= 0)):
            if labels[start]:
                continue
            count += 1
            labels[start], stack = count, [start]
            while stack:
                y, x = stack.pop()
                for yy in range(max(y - 1, 0), min(y + 2, h)):
                    for xx in range(max(x - 1, 0), min(x + 2, w)):
                        if not labels[yy, xx] and classes[yy, xx] == classes[y, x]:
                            labels[yy, xx] = count
                            stack.append((yy, xx))
        return labels

    rng = np.random.default_rng(0)
    for _ in range(50):
        classes = rng.integers(-1, 2, size=rng.integers(1, 24, size=2))
        ours, reference = connected_components(classes), flood_fill(classes)
        assert np.array_equal(ours == 0, reference == 0)
        pairs = set(zip(ours.ravel(), reference.ravel()))  # a bijection between labels iff same partition
        assert len(pairs) == len(np.unique(ours)) == len(np.unique(reference))
