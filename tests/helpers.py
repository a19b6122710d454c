"""One comparison helper whose failures explain themselves."""

from __future__ import annotations

import torch


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "tensor") -> None:
    """Like torch.testing.assert_close, but the message gives the mismatch count, the worst index,
    the max abs/rel difference and NaN/inf counts of both sides."""
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())  # NaN compares False -> counted as bad
    if bad.any():
        flat = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff).flatten()
        worst = int(flat.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        rel = (diff / e.abs().clamp_min(1e-12)).nan_to_num(float("inf"))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (atol={atol}, rtol={rtol}); worst at {idx}: "
            f"actual={a.flatten()[worst].item():.8g} expected={e.flatten()[worst].item():.8g}; "
            f"max abs diff={diff.nan_to_num(float('inf')).max().item():.3g}, max rel diff={rel.max().item():.3g}; "
            f"NaN/inf actual={int(torch.isnan(a).sum())}/{int(torch.isinf(a).sum())}, "
            f"expected={int(torch.isnan(e).sum())}/{int(torch.isinf(e).sum())}")
