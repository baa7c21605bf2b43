"""adam_step (the direct fused-Adam call of the training step) is opt.step() bit-for-bit."""

import torch

from psm.training.train import adam_step


def _run(direct: bool, **kw) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.randn(16, 4, requires_grad=True), torch.randn(16, requires_grad=True)]
    opt = torch.optim.Adam(params, lr=1e-2, fused=True, **kw)
    for i in range(12):
        for p in params:
            p.grad = None
        loss = sum(((p * (i + 1)).sin() ** 2).sum() for p in params)
        loss.backward()
        opt.param_groups[0]["lr"] = 1e-2 / (1 + i)
        (adam_step if direct else type(opt).step)(opt)
    return [*params, *(opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq", "step"))]


def test_adam_step_is_opt_step_bit_for_bit():
    for kw in ({}, {"weight_decay": 0.1}, {"decoupled_weight_decay": True, "weight_decay": 0.1}):
        want, got = _run(False, **kw), _run(True, **kw)
        assert all(torch.equal(a, b) for a, b in zip(want, got)), kw
    # the direct call really moves the weights and counts the steps
    assert _run(True)[-1].item() == 12.0
    torch.manual_seed(0)
    assert not torch.equal(_run(True)[0], torch.randn(16, 4))


def test_adam_step_falls_back_for_amsgrad():
    want, got = _run(False, amsgrad=True), _run(True, amsgrad=True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_this_torch_takes_the_direct_path():
    from psm.training.train import direct_adam_matches

    assert direct_adam_matches()  # else adam_step silently costs what opt.step() costs
