"""λ(t) shapes, the window, and progress read from the noise level."""

import itertools
import math

import pytest

from lib_delta.schedule import SCHEDULES, ProgressClock, in_window, strength_at


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_shape_starts_at_full_strength(name):
    assert strength_at(0.2, 2.0, name, 0.2, 0.8) == pytest.approx(2.0)


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s != "constant"])
def test_decays_are_monotone_and_reach_zero_at_the_window_end(name):
    values = [strength_at(0.5 * i / 50, 1.0, name, 0.0, 0.5) for i in range(50)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
    assert strength_at(0.5 - 1e-9, 1.0, name, 0.0, 0.5) == pytest.approx(0.0, abs=1e-6)


def test_known_values():
    assert strength_at(0.5, 1.0, "linear", 0.0, 1.0) == pytest.approx(0.5)
    assert strength_at(0.5, 1.0, "cosine", 0.0, 1.0) == pytest.approx(0.5)
    assert strength_at(0.25, 1.0, "cosine", 0.0, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert strength_at(0.5, 1.0, "sigmoid", 0.0, 1.0) == pytest.approx(0.5)
    k = 5.0
    expected = (math.exp(-k * 0.5) - math.exp(-k)) / (1 - math.exp(-k))
    assert strength_at(0.5, 1.0, "exponential", 0.0, 1.0) == pytest.approx(expected)
    assert strength_at(0.3, -0.5, "constant", 0.0, 1.0) == -0.5


def test_window_edges():
    assert in_window(0.0, 0.0, 0.5) and in_window(0.49, 0.0, 0.5) and not in_window(0.5, 0.0, 0.5)
    assert in_window(1.0, 0.0, 1.0)  # the end of sampling belongs to a full window
    assert not in_window(0.5, 0.5, 0.5)  # start == end: empty
    assert strength_at(0.9, 1.0, "constant", 0.0, 0.5) == 0.0
    assert strength_at(0.1, 1.0, "constant", 0.2, 1.0) == 0.0


def test_progress_at_schedule_points_and_between():
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    clock = ProgressClock(sigmas)
    assert [clock.progress(s) for s in sigmas] == [0.0, 0.25, 0.5, 0.75, 1.0]
    mid = math.sqrt(14.6 * 7.0)  # a second-order sampler's midpoint in log-sigma
    assert clock.progress(mid) == pytest.approx(0.125)
    assert clock.progress(0.5) == pytest.approx(0.75 + 0.25 * 0.5)  # linear into the final zero
    assert clock.progress(100.0) == 0.0


def test_progress_for_truncated_img2img_schedule():
    full = [14.6, 7.0, 3.0, 1.0, 0.0]
    clock = ProgressClock(full[2:])  # denoising strength 0.5: the sampler walks only the second half
    assert clock.progress(3.0) == 0.0 and clock.progress(1.0) == 0.5


def test_progress_for_timesteps_is_linear():
    clock = ProgressClock([999, 749, 499, 249, 0], log_space=False)
    assert clock.progress(624) == pytest.approx(0.375)


def test_bad_schedules():
    with pytest.raises(ValueError, match="at least two"):
        ProgressClock([1.0])
    with pytest.raises(ValueError, match="must not increase"):
        ProgressClock([1.0, 2.0])
