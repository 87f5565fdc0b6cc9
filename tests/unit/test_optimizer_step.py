"""fp16 with a gradient scaler: the critic's gradients must be the true gradients while the
policy also steps (algorithm.md, known defect of the reference code's shared-scaler scheme)."""

from __future__ import annotations

import torch
from torch import nn

from tdpo.methods.base import optimizer_step

SCALE = 2.0**10  # large enough to show a double unscale, small enough for fp16


def _models():
    torch.manual_seed(0)
    return nn.Linear(8, 1), nn.Linear(8, 1)  # stand-ins: "policy" and "critic"


def _loss(policy, critic, x):
    with torch.autocast("cpu", dtype=torch.float16):
        return (policy(x) ** 2).mean() + ((critic(x) - 1.0) ** 2).mean()


def _true_critic_grads(x):
    policy, critic = _models()
    ((policy(x) ** 2).mean() + ((critic(x) - 1.0) ** 2).mean()).backward()
    return [p.grad.clone() for p in critic.parameters()]


def _record_step_grads(optimizer, params):
    seen = []
    optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in params]))
    return seen


def test_one_optimizer_two_groups_gives_true_critic_gradients():
    x = torch.randn(16, 8)
    policy, critic = _models()
    optimizer = torch.optim.AdamW(
        [{"params": policy.parameters()}, {"params": critic.parameters()}]
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    seen = _record_step_grads(optimizer, list(critic.parameters()))
    scaler.scale(_loss(policy, critic, x)).backward()
    optimizer_step(
        optimizer, [(list(policy.parameters()), 1e9), (list(critic.parameters()), 1e9)], scaler
    )
    assert len(seen) == 1, "the optimizer did not step"
    for got, want in zip(seen[0], _true_critic_grads(x)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)


def _reference_scheme_critic_grads(x):
    """The reference code: two optimizers sharing one scaler, each clip unscaling every optimizer
    (accelerate's clip_grad_norm_), each step followed by scaler.update()."""
    policy, critic = _models()
    opt_policy = torch.optim.AdamW(policy.parameters())
    opt_critic = torch.optim.AdamW(critic.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    seen = _record_step_grads(opt_critic, list(critic.parameters()))
    scaler.scale(_loss(policy, critic, x)).backward()
    for opt in (opt_policy, opt_critic):  # clip_grad_norm_(policy) unscales all optimizers
        scaler.unscale_(opt)
    scaler.step(opt_policy)
    scaler.update()  # resets the per-optimizer "already unscaled" state
    for opt in (opt_policy, opt_critic):  # clip_grad_norm_(critic) unscales all again
        scaler.unscale_(opt)
    scaler.step(opt_critic)
    scaler.update()
    return seen[0]


def test_the_reference_shared_scaler_scheme_would_fail_this_check():
    x = torch.randn(16, 8)
    wrong = _reference_scheme_critic_grads(x)
    true = _true_critic_grads(x)
    ratio = (true[0].abs().sum() / wrong[0].abs().sum()).item()
    assert abs(ratio - SCALE) / SCALE < 0.05, f"critic gradients were not unscaled twice ({ratio})"


def test_clipping_is_per_model():
    x = torch.randn(16, 8) * 100
    policy, critic = _models()
    optimizer = torch.optim.SGD(
        [{"params": policy.parameters()}, {"params": critic.parameters()}], lr=0.0
    )
    ((policy(x) ** 2).mean() + ((critic(x) - 1.0) ** 2).mean()).backward()
    seen = _record_step_grads(optimizer, list(policy.parameters()) + list(critic.parameters()))
    norms = optimizer_step(
        optimizer, [(list(policy.parameters()), 1.0), (list(critic.parameters()), 0.5)]
    )
    assert norms[0] > 1.0 and norms[1] > 0.5
    grads = seen[0]
    policy_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[:2]]))
    critic_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[2:]]))
    assert abs(policy_norm.item() - 1.0) < 1e-3 and abs(critic_norm.item() - 0.5) < 1e-3
