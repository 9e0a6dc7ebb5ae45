"""Exact, position-sensitive fingerprints of weight tensors, to prove that two copies hold the same bits.

A fingerprint is two sums over a tensor's bytes read as 32-bit words: a plain one and one weighted by
position. Any changed value moves the first; a tensor written transposed, or an expert written into
another's slot, keeps the plain sum but moves the weighted one. The sums wrap around (arithmetic
modulo 2**32), and wrapping addition does not depend on order, so the same bits give the same
fingerprint on any device.
"""

from __future__ import annotations

import torch

# Position weights repeat with this period (a prime, so that a transposed matrix's words get other
# weights unless a side is 1 modulo it); a chunk a whole number of periods long reuses one weight vector.
_PERIOD = 65521
_CHUNK = _PERIOD * 256

_weights_by_device: dict[torch.device, torch.Tensor] = {}


def _position_weights(device: torch.device) -> torch.Tensor:
    if device not in _weights_by_device:
        _weights_by_device[device] = torch.arange(_CHUNK, device=device, dtype=torch.int32) % _PERIOD + 1
    return _weights_by_device[device]


def _words(tensor: torch.Tensor) -> torch.Tensor:
    raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
    if raw.numel() % 4 == 0:
        return raw.view(torch.int32)  # no copy: a bf16 tensor is read two values to a word
    return raw.to(torch.int32)


@torch.no_grad()
def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """int32 [2] on the tensor's device: (sum of words, position-weighted sum), both modulo 2**32."""
    words = _words(tensor)
    weights = _position_weights(words.device)
    sums = torch.zeros(2, dtype=torch.int32, device=words.device)
    for chunk in words.split(_CHUNK):
        sums[0] += chunk.sum(dtype=torch.int32)
        sums[1] += (chunk * weights[: chunk.numel()]).sum(dtype=torch.int32)
    return sums


def fingerprints(named_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor's fingerprint, brought to the host in one copy per device."""
    prints = [fingerprint(t) for t in named_tensors.values()]
    if not prints:
        return {}
    same_device = len({p.device for p in prints}) == 1
    stacked = torch.stack(prints).cpu() if same_device else torch.stack([p.cpu() for p in prints])
    return dict(zip(named_tensors, stacked))


def differing(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Names in `expected` whose fingerprint `actual` lacks or has otherwise."""
    return [name for name, print_ in expected.items() if name not in actual or not torch.equal(print_, actual[name])]
