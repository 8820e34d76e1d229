"""Words for numbers: a share of a model is never printed as more than it is."""

import pytest

from surgery.text import percent


@pytest.mark.parametrize(
    "share, shown",
    [
        (1.0, "100.0%"),
        (0.5, "50.0%"),
        (0.0, "0.0%"),
        (0.99991, "99.99%"),
        (0.999998, "99.99%"),
        (0.9996, "99.96%"),
    ],
)
def test_percent(share, shown):
    assert percent(share) == shown


def test_no_partial_share_reads_as_whole():
    assert all(percent(1 - 10.0**-k) != "100.0%" and "100" not in percent(1 - 10.0**-k) for k in range(1, 16))
