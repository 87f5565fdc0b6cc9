"""Neuron scores, masks, re-initialization and optimizer-moment reset."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tdpo.algos.neurons import (
    dormant_overlap,
    hidden_linear_layers,
    neuron_fractions,
    neuron_masks,
    neuron_scores,
    reset_neurons,
)


def tiny_head() -> nn.Sequential:
    """Linear(2,3) - Dropout(0.5) - Linear(3,2) - Linear(2,1) with known weights."""
    head = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5), nn.Linear(3, 2), nn.Linear(2, 1))
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        head[0].bias.zero_()
        head[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
        head[2].bias.copy_(torch.tensor([0.5, 0.0]))
        head[3].weight.copy_(torch.tensor([[1.0, 1.0]]))
        head[3].bias.zero_()
    return head


INPUTS = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
# layer 0: h = [[1, 2, -3], [3, -1, -2]]; relu -> [[1, 2, 0], [3, 0, 0]]; mean over x [2, 1, 0];
#          layer mean 1 -> s = [2, 1, 0]
# layer 1 (after dropout = identity in eval): h = [[1.5, -2], [3.5, 1]]; relu -> [[1.5, 0], [3.5, 1]];
#          mean over x [2.5, 0.5]; layer mean 1.5 -> s = [5/3, 1/3]
EXPECTED_SCORES = [[2.0, 1.0, 0.0], [5 / 3, 1 / 3]]


def test_hidden_linear_layers_are_all_but_the_last_linear():
    head = tiny_head()
    assert hidden_linear_layers(head) == [head[0], head[2]]


def test_neuron_scores_hand_computed_in_eval_mode_and_modes_restored():
    head = tiny_head()
    head.train()
    for _ in range(3):  # dropout p=0.5 would make these random if the pass ran in train mode
        scores = neuron_scores(head, INPUTS)
        for got, expected in zip(scores, EXPECTED_SCORES):
            torch.testing.assert_close(got, torch.tensor(expected))
    assert head.training and head[1].training
    assert all(not m._forward_hooks for m in head.modules())

    head.eval()
    neuron_scores(head, INPUTS)
    assert not head.training and not head[1].training


def test_neuron_scores_with_relu_head():
    head = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        head[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        head[0].bias.zero_()
    (scores,) = neuron_scores(head, INPUTS)
    torch.testing.assert_close(scores, torch.tensor([2.0, 1.0, 0.0]))


def test_neuron_masks_and_fractions():
    scores = [torch.tensor(s) for s in EXPECTED_SCORES]
    dormant, active = neuron_masks(scores, tau=0.0)
    assert [m.tolist() for m in dormant] == [[False, False, True], [False, False]]
    assert [m.tolist() for m in active] == [[True, True, False], [True, True]]
    dormant, _ = neuron_masks(scores, tau=0.5)
    assert [m.tolist() for m in dormant] == [[False, False, True], [False, True]]
    assert neuron_fractions(dormant) == pytest.approx((2 / 5, 3 / 5))


def test_dormant_overlap_hand_values():
    prev = [torch.tensor([True, False, True]), torch.tensor([False, True])]
    cur = [torch.tensor([True, True, False]), torch.tensor([False, True])]
    # currently dormant: 3; also dormant before: layer0[0], layer1[1] -> 2/3
    assert dormant_overlap(prev, cur) == pytest.approx(2 / 3)
    assert math.isnan(dormant_overlap(None, cur))
    none = [torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)]
    assert math.isnan(dormant_overlap(prev, none))
    # overlap is not symmetric in general and not always 1 (the reference code's bug)
    assert dormant_overlap(cur, prev) == pytest.approx(2 / 3)
    assert (
        dormant_overlap(prev, [torch.tensor([False, True, False]), torch.tensor([False, False])])
        == 0.0
    )


def reference_like_head(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.Dropout(0.2),
        nn.Linear(8, 5),
        nn.Dropout(0.1),
        nn.Linear(5, 4),
        nn.Linear(4, 1),
    )


MASKS = [
    torch.tensor([True, False, False, True, False, True, False, False]),
    torch.tensor([False, True, False, False, True]),
    torch.tensor([True, False, False, False]),
]


def trained_optimizer(head: nn.Module, params: list[nn.Parameter], amsgrad: bool = False):
    optimizer = torch.optim.AdamW(params, lr=1e-2, amsgrad=amsgrad)
    g = torch.Generator().manual_seed(1)
    head.train()
    for _ in range(3):
        x = torch.randn(16, 6, generator=g)
        loss = head(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def expected_changed(head: nn.Sequential, masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Which entries of each parameter are re-initialized (by name)."""
    linears = [(name, m) for name, m in head.named_children() if isinstance(m, nn.Linear)]
    changed = {}
    for index, (name, layer) in enumerate(linears):
        w = torch.zeros_like(layer.weight, dtype=torch.bool)
        b = torch.zeros_like(layer.bias, dtype=torch.bool)
        if index < len(masks):  # incoming rows and bias of this layer's reset neurons
            w[masks[index], :] = True
            b[masks[index]] = True
        if index > 0:  # outgoing columns of the previous layer's reset neurons
            w[:, masks[index - 1]] = True
        changed[f"{name}.weight"] = w
        changed[f"{name}.bias"] = b
    return changed


def snapshot(head: nn.Module, optimizer: torch.optim.Optimizer):
    params = {n: p.detach().clone() for n, p in head.named_parameters()}
    moments = {
        n: {k: v.clone() for k, v in optimizer.state[p].items()}
        for n, p in head.named_parameters()
        if p in optimizer.state
    }
    return params, moments


@pytest.mark.parametrize("amsgrad", [False, True])
def test_reset_changes_exactly_masked_entries_and_their_moments(amsgrad):
    head = reference_like_head()
    # parameters deliberately out of module order, plus a foreign parameter first: a reset by
    # integer index into the optimizer state would hit the wrong tensors
    foreign = nn.Parameter(torch.zeros(8, 6))
    params = [foreign, *reversed(list(head.parameters()))]
    optimizer = trained_optimizer(head, params, amsgrad=amsgrad)
    foreign.grad = torch.ones_like(foreign)
    optimizer.step()
    before_params, before_moments = snapshot(head, optimizer)
    foreign_before = {k: v.clone() for k, v in optimizer.state[foreign].items()}
    for moments in before_moments.values():
        assert moments["exp_avg"].ne(0).all() and moments["exp_avg_sq"].ne(0).all()

    n = reset_neurons(
        head,
        MASKS,
        weight_std=0.05,
        optimizer=optimizer,
        generator=torch.Generator().manual_seed(3),
    )
    assert n == 3 + 2 + 1
    changed = expected_changed(head, MASKS)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for name, param in head.named_parameters():
        mask = changed[name]
        after = param.detach()
        assert torch.equal(after[~mask], before_params[name][~mask]), name
        if name.endswith("bias"):
            assert torch.all(after[mask] == 0), name
        else:
            assert torch.all(after[mask] != before_params[name][mask]), name
            assert after[mask].abs().max() < 0.05 * 6, name  # drawn with std 0.05
        state = optimizer.state[param]
        for key in keys:
            assert torch.all(state[key][mask] == 0), (name, key)
            assert torch.equal(state[key][~mask], before_moments[name][key][~mask]), (name, key)
        assert torch.equal(state["step"], before_moments[name]["step"])
    assert changed["5.bias"].sum() == 0  # the output layer's bias is never touched
    for key, value in optimizer.state[foreign].items():
        assert torch.equal(value, foreign_before[key])


def test_reset_outgoing_zero_versus_redraw():
    zero_head, redraw_head = reference_like_head(), reference_like_head()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    reset_neurons(zero_head, MASKS, 0.1, outgoing="zero", generator=gen())
    reset_neurons(redraw_head, MASKS, 0.1, outgoing="redraw", generator=gen())
    zero_linears = [m for m in zero_head if isinstance(m, nn.Linear)]
    redraw_linears = [m for m in redraw_head if isinstance(m, nn.Linear)]
    for index, mask in enumerate(MASKS):
        nxt = index + 1
        rows_reset = MASKS[nxt] if nxt < len(MASKS) else torch.zeros(1, dtype=torch.bool)
        # outgoing columns: zero (except where the next layer's own reset redrew its rows)
        cols = zero_linears[nxt].weight[~rows_reset][:, mask]
        assert cols.numel() > 0 and torch.all(cols == 0)
        redrawn = redraw_linears[nxt].weight[~rows_reset][:, mask]
        assert torch.all(redrawn != 0)
    # the incoming rows of layer 0 are the generator's first draw in both modes
    torch.testing.assert_close(zero_linears[0].weight[MASKS[0]], redraw_linears[0].weight[MASKS[0]])
    with pytest.raises(ValueError, match="outgoing"):
        reset_neurons(zero_head, MASKS, 0.1, outgoing="ones")


def test_reset_skips_params_absent_from_optimizer_state_and_is_reproducible():
    head = reference_like_head()
    last = [m for m in head if isinstance(m, nn.Linear)][-1]
    params = [p for p in head.parameters() if p is not last.weight and p is not last.bias]
    optimizer = trained_optimizer(head, params)
    other = reference_like_head()
    assert last.weight not in optimizer.state
    reset_neurons(head, MASKS, 0.1, optimizer=optimizer, generator=torch.Generator().manual_seed(7))
    reset_neurons(other, MASKS, 0.1, generator=torch.Generator().manual_seed(7))
    assert last.weight not in optimizer.state  # no state was created for it
    linears_a = [m for m in head if isinstance(m, nn.Linear)]
    linears_b = [m for m in other if isinstance(m, nn.Linear)]
    # same generator, same masks -> the same redrawn entries, whatever the optimizer
    changed = expected_changed(head, MASKS)
    for (name, a), b in zip(head.named_parameters(), other.parameters()):
        if not name.endswith("bias"):
            torch.testing.assert_close(a[changed[name]], b[changed[name]])
    assert linears_a[0].weight.shape == linears_b[0].weight.shape


def test_reset_draws_with_the_given_std():
    head = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 1))
    mask = [torch.ones(256, dtype=torch.bool)]
    assert reset_neurons(head, mask, 0.02, generator=torch.Generator().manual_seed(0)) == 256
    assert head[0].weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert head[0].weight.mean().item() == pytest.approx(0.0, abs=0.001)
    assert torch.all(head[0].bias == 0)


def test_reset_mask_count_mismatch_raises():
    with pytest.raises(ValueError):
        reset_neurons(reference_like_head(), MASKS[:2], 0.1)
