"""The reward's reliability near the borders: the band is where the labels change, in either mask."""
import numpy as np

from rl_adapt.evaluation.reliability import border_band


def test_border_band_covers_both_masks_borders_and_nothing_far_away():
    pred = np.zeros((40, 40), np.uint8)
    truth = np.zeros((40, 40), np.uint8)
    pred[10:20, 10:20] = 1
    truth[22:30, 22:30] = 2
    band = border_band(pred, truth, width=2)
    assert band[10, 15] and band[9, 15] and band[12, 15]  # on and around pred's top edge
    assert not band[15, 15]  # the middle of pred's square is 5 px from its border
    assert band[22, 25] and band[29, 25]  # truth's edges
    assert not band[0, 0] and not band[38, 5]  # far from both
    assert not border_band(np.zeros((5, 5)), np.zeros((5, 5))).any()
    wide = border_band(pred, truth, width=5)
    assert wide.sum() > band.sum() and (wide | band).sum() == wide.sum()
