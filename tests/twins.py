"""Twin runs: the same training with and without a tracker (a helper for the tests, not a test module)."""

from __future__ import annotations

import copy

import torch

from lightning_adamtype import ConditionTracker

__all__ = ["assert_training_untouched", "run_twins", "state_equal"]


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


def state_equal(a: dict, b: dict) -> bool:
    """Two optimizer states (one parameter's) are bitwise equal: same keys, tensors torch.equal (sparse ones
    densified), lists and tuples item by item (LBFGS keeps lists of tensors), others ==."""
    return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape):
            return False
        return torch.equal(x.to_dense(), y.to_dense()) if x.is_sparse else torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return isinstance(y, type(x)) and len(x) == len(y) and all(map(_same, x, y))
    if isinstance(x, dict):
        return isinstance(y, dict) and state_equal(x, y)
    return x == y


class _SparseNet(torch.nn.Module):
    """An embedding with sparse gradients (SparseAdam) feeding a 3→2 map held fixed (it has no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 3, sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = (x.abs() * 10).long().clamp_(max=9)[:, 0]
        return torch.tanh(self.embedding(index))[:, :2]


def run_twins(make_optimizer, steps: int = 12, none_at=(3,), tracker_kwargs: dict | None = None, seed: int = 0,
              closure: bool = False, sparse: bool = False):
    """The same training (a 4→3→2 tanh net, MSE, one data stream, the last parameter without a gradient at the
    1-based steps ``none_at``) twice, with ``make_optimizer(parameters)``, the second run tracked; after every step
    the parameters and optimizer states are asserted bitwise equal. ``closure``: step with a closure (LBFGS);
    ``sparse``: an embedding with sparse gradients instead of the net. Returns the tracker."""
    torch.manual_seed(seed)
    template: torch.nn.Module = _SparseNet() if sparse else torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    )
    models = [copy.deepcopy(template) for _ in range(2)]
    opts = [make_optimizer(list(m.parameters())) for m in models]
    tracker = ConditionTracker(opts[1], **(tracker_kwargs or {}))
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(1, steps + 1):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        for model, opt in zip(models, opts):

            def loss_and_grads(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                if t in none_at:
                    list(model.parameters())[-1].grad = None
                return loss

            if closure:
                opt.step(loss_and_grads)
            else:
                loss_and_grads()
                opt.step()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q), f"step {t}: a tracked parameter differs from its untracked twin"
            assert state_equal(opts[0].state.get(p, {}), opts[1].state.get(q, {})), f"step {t}: optimizer state differs"
    return tracker
