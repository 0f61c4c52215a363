"""Live-tensor memory accounting used by the memory tests and benchmarks."""

import torch

from entropy_lens.testing.memtrack import LiveTensorBytes, live_peak_bytes


def test_counts_allocations_not_views_or_inputs():
    x = torch.randn(100, 100)
    with LiveTensorBytes() as mode:
        a = torch.empty(1000)  # 4000 bytes
        b = a[10:20].view(2, 5)  # a view: no new bytes
        x.mul_(2.0)  # in place on an input: not counted
        del a
        c = torch.empty(250)  # b still holds the first storage -> 5000 live
        del b, c
        d = torch.empty(10)
        peak, current = mode.peak, mode.current
    assert peak == 5000 and current == 40
    del d


def test_select_counts_only_the_chosen_tensors():
    def work():
        wide = torch.zeros(8, 300)  # 9600 bytes, last dim 300
        narrow = torch.zeros(50, 7)  # 1400 bytes
        return wide.sum() + narrow.sum()

    assert live_peak_bytes(work, lambda t: t.dim() >= 1 and t.shape[-1] == 300) == 9600
    assert live_peak_bytes(work) >= 9600 + 1400
