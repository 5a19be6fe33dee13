"""t2i.metrics: heatmap localisation (IoU over thresholds, pointing, calibrated tau), mass share and
correlation, and prompt fidelity judged by the segmenter, on hand-made cases."""
import numpy as np
import pytest
from conftest import two_objects

from t2i.data.shapes import ShapesConfig, render_scene
from t2i.metrics import (DAAM_TAU, TAUS, calibrate_tau, centre_prior_map, iou_curve, pointing, scale_to_peak,
                         score_fidelity, uniform_map)
from t2i.segment import segment


def test_perfect_and_wrong_maps():
    a, b = two_objects()
    perfect = a.astype(np.float32)
    np.testing.assert_allclose(iou_curve(perfect, a), 1.0)
    assert pointing(perfect, a)[0] == 1.0
    wrong = b.astype(np.float32)
    np.testing.assert_allclose(iou_curve(wrong, a), 0.0)
    assert pointing(wrong, a)[0] == 0.0


def test_uniform_map_scores_area_fraction():
    a, _ = two_objects()
    fraction = a.sum() / a.size
    flat = uniform_map(32, 32)[None]
    np.testing.assert_allclose(iou_curve(flat, a), fraction)            # every tau
    np.testing.assert_allclose(pointing(flat, a), fraction)             # ties split over the image


def test_scale_to_peak_and_centre_prior():
    m = np.array([[0.0, 2.0], [1.0, -1.0]])
    np.testing.assert_allclose(scale_to_peak(m), [[0, 1], [0.5, 0]])
    np.testing.assert_array_equal(scale_to_peak(np.zeros((3, 3))), np.ones((3, 3)))
    c = centre_prior_map(32, 32)
    assert c.max() == pytest.approx(1.0, abs=0.01) and c[15:17, 15:17].min() == c.max()
    assert c[0, 0] < 0.05
    with pytest.raises(ValueError, match="both be"):
        iou_curve(np.zeros((1, 4, 4)), np.zeros((1, 5, 5), bool))


def test_calibration_picks_the_threshold_between_object_and_halo():
    masks = np.zeros((5, 16, 16), bool)
    maps = np.full((5, 16, 16), 0.2, np.float32)
    for i in range(5):
        y, x = 2 + i, 3 + i
        maps[i, y - 2:y + 8, x - 2:x + 8] = 0.55                       # a halo around the object
        maps[i, y:y + 6, x:x + 6] = 0.65                               # the object itself
        masks[i, y:y + 6, x:x + 6] = True
    tau, mean = calibrate_tau(maps / 0.65, masks)                      # normalised: object 1, halo 0.85, rest 0.31
    assert tau == 0.9 and mean.max() == pytest.approx(1.0)
    tau, mean = calibrate_tau(maps, masks)                             # raw values: only 0.6 separates them
    assert tau == 0.6 and mean[TAUS.index(0.6)] == pytest.approx(1.0)
    tau, mean = calibrate_tau(np.zeros((0, 16, 16)), np.zeros((0, 16, 16), bool))
    assert tau == DAAM_TAU and np.isnan(mean).all()


def test_mass_share_and_correlation():
    from t2i.metrics import correlation, effect_share, mass_share
    a, b = two_objects()
    both = (a | b).astype(np.float32)
    assert mass_share(both, a)[0] == pytest.approx(0.5) and effect_share(a[0] * 3.0, a[0]) == 1.0
    assert mass_share(np.zeros_like(both), a)[0] == pytest.approx(a.mean())    # no change: counts as uniform
    assert correlation(a, a)[0] == pytest.approx(1.0) and correlation(a, b)[0] < 0
    assert correlation(np.ones_like(both), a)[0] == 0                            # a constant map says nothing


def test_fidelity_counts_only_stated_attributes():
    scene = next(s for s in (render_scene(ShapesConfig(max_objects=1), i) for i in range(50))
                 if s.stated == ("colour", "shape"))
    tally = score_fidelity(scene, segment(scene.image))
    assert tally.trials["size"] == tally.trials["position"] == tally.trials["relation"] == 0
    assert tally.rate("exact") == 1.0
    blank = np.full_like(scene.image, 235)
    tally = score_fidelity(scene, segment(blank))
    assert tally.rate("recall") == 0.0 and tally.rate("colour") is None and tally.rate("exact") == 0.0
