"""Labels on a stage link (worker/label_wire.py): the narrow form where it fits, exact both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptjt_core.ul2 import IGNORE
from worker.label_wire import LabelWireError, labels_from_wire, labels_to_wire


def _labels(high: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, high, (2, 64), generator=g)
    labels[:, :10] = IGNORE  # a prefix carries no loss
    labels[1, 40] = high - 1
    return labels


@pytest.mark.parametrize("high,width", [(50_400, 2), (0xFFFF, 2), (0xFFFF + 1, 4), (250_000, 4), (2**31, 4)])
def test_labels_cross_the_link_exactly_in_the_narrowest_width(high, width):
    labels = _labels(high)
    wire = labels_to_wire(labels)
    assert len(wire) == width * labels.numel()
    back = labels_from_wire(wire, 2, 64)
    assert back.dtype == torch.int64 and torch.equal(back, labels)


def test_a_micro_batch_of_only_ignored_positions_is_narrow():
    labels = torch.full((1, 8), IGNORE)
    assert torch.equal(labels_from_wire(labels_to_wire(labels), 1, 8), labels)
    assert len(labels_to_wire(labels)) == 16


@pytest.mark.parametrize("bad", [-1, -101, 2**31])
def test_a_label_no_width_holds_is_refused_with_its_value(bad):
    labels = torch.zeros(1, 4, dtype=torch.int64)
    labels[0, 2] = bad
    with pytest.raises(LabelWireError, match=str(bad)):
        labels_to_wire(labels)


@pytest.mark.parametrize("nbytes", [0, 7, 8 * 6, 3 * 6])
def test_bytes_of_neither_width_are_refused_naming_both(nbytes):
    with pytest.raises(LabelWireError, match=r"expected 12 or 24"):
        labels_from_wire(bytes(nbytes), 2, 3)


def test_the_narrow_ignore_code_decodes_to_ignore_and_wide_values_keep_their_sign():
    narrow = np.array([0xFFFF, 5], dtype="<u2").tobytes()
    assert labels_from_wire(narrow, 1, 2).tolist() == [[IGNORE, 5]]
    wide = np.array([IGNORE, -7], dtype="<i4").tobytes()  # -7 passes here; check_labels refuses it
    assert labels_from_wire(wide, 1, 2).tolist() == [[IGNORE, -7]]
