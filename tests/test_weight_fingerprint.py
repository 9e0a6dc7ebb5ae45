"""Fingerprints tell equal bits from any change a wrong push makes: one value, a transpose, two experts swapped."""

import pytest
import torch

from opd_local import weight_fingerprint
from opd_local.weight_fingerprint import fingerprint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fingerprint_moves_with_any_misplaced_or_changed_value(dtype):
    g = torch.Generator().manual_seed(0)
    square = torch.randn(64, 64, generator=g).to(dtype)
    experts = torch.randn(4, 32, 16, generator=g).to(dtype)
    assert torch.equal(fingerprint(square), fingerprint(square.clone()))
    assert torch.equal(fingerprint(square.t()), fingerprint(square.t().contiguous()))
    assert not torch.equal(fingerprint(square), fingerprint(square.t()))
    swapped = experts[[1, 0, 2, 3]]
    assert fingerprint(swapped)[0] == fingerprint(experts)[0]  # the plain sum alone would miss it
    assert not torch.equal(fingerprint(experts), fingerprint(swapped))
    nudged = square.clone()
    nudged[17, 3] = torch.nextafter(nudged[17, 3].float(), torch.tensor(1e9)).to(dtype)
    if torch.equal(nudged, square):  # the float32 step rounds back in 16 bits
        nudged[17, 3] += 1
    assert not torch.equal(fingerprint(square), fingerprint(nudged))
    assert fingerprint(torch.ones(3, dtype=dtype)).dtype == torch.int32  # an odd byte count is read byte by byte


def test_fingerprint_spans_chunks(monkeypatch):
    """A tensor longer than one chunk: a change in a later chunk moves it, and chunking gives the same sums."""
    monkeypatch.setattr(weight_fingerprint, "_CHUNK", weight_fingerprint._PERIOD * 2)
    monkeypatch.setattr(weight_fingerprint, "_weights_by_device", {})
    long = torch.randn(weight_fingerprint._PERIOD * 5 + 7, generator=torch.Generator().manual_seed(1))
    chunked = fingerprint(long)
    changed = long.clone()
    changed[-3] += 1.0
    assert not torch.equal(chunked, fingerprint(changed))
    monkeypatch.setattr(weight_fingerprint, "_CHUNK", weight_fingerprint._PERIOD * 8)
    monkeypatch.setattr(weight_fingerprint, "_weights_by_device", {})
    assert torch.equal(chunked, fingerprint(long))
