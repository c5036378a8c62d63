"""Twin runs: the same training with and without a tracker (a helper for the tests, not a test module)."""

from __future__ import annotations

import torch

from lightning_adamtype import ConditionTracker

__all__ = ["assert_training_untouched"]


def assert_training_untouched(sizes, tracker_kwargs: dict, device: str = "cpu", fused: bool = False) -> None:
    """Adam with and without a tracker, the same gradients: after every one of 5 steps the parameters, gradients
    and state of the tracked optimizer are bitwise equal to the untracked twin's (and the tracker did measure)."""
    torch.manual_seed(0)
    twins = []
    tracker = None
    for tracked in (False, True):
        params = [torch.nn.Parameter(torch.ones(n, device=device)) for n in sizes]
        opt = torch.optim.Adam(params, lr=1e-2, fused=fused or None)
        if tracked:
            tracker = ConditionTracker(opt, **tracker_kwargs)
        twins.append((params, opt))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
        for params, opt in twins:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        (bare, bare_opt), (tracked, tracked_opt) = twins
        for p, q in zip(bare, tracked):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(bare_opt.state[p][key], tracked_opt.state[q][key]), key
    assert tracker is not None and tracker.attached
    measured = tracker.compute()
    assert measured and all(v["measured"] == 1.0 and v["steps"] > 0 for v in measured.values()), measured
