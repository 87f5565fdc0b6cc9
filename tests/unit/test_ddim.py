"""DDIM step + log-prob against the oracles: diffusers' DDIMScheduler.step and torch Normal."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from tdpo.algos.ddim import DDIMStepOutput, ddim_step_logprob, gaussian_log_prob

SHAPE = (3, 4, 5, 5)
NUM_STEPS = 10


def make_scheduler(**overrides) -> DDIMScheduler:
    kwargs = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    kwargs.update(overrides)
    scheduler = DDIMScheduler(**kwargs)
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


def tensors(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    model_output = scale * torch.randn(SHAPE, generator=g)
    sample = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    return model_output, sample, noise


def oracle(scheduler, model_output, t, sample, eta, noise):
    return scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample


def mean_from_noise(out: DDIMStepOutput, noise: torch.Tensor) -> torch.Tensor:
    return out.mean + out.std * noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_matches_scheduler_step_every_timestep(prediction_type, set_alpha_to_one):
    scheduler = make_scheduler(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    for i, t in enumerate(scheduler.timesteps):  # includes the final step (prev timestep < 0)
        model_output, sample, noise = tensors(i)
        expected = oracle(scheduler, model_output, t, sample, 1.0, noise)
        out = ddim_step_logprob(scheduler, model_output, t, sample, eta=1.0)
        got = mean_from_noise(out, noise)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # sigma_t against the scheduler's own variance
        prev_t = int(t) - 1000 // NUM_STEPS
        sigma = scheduler._get_variance(int(t), prev_t) ** 0.5
        torch.testing.assert_close(out.std.flatten(), sigma.expand(SHAPE[0]))
        assert out.std.shape == (SHAPE[0], 1, 1, 1)


def test_final_step_uses_final_alpha_cumprod_not_clamped_timestep():
    # set_alpha_to_one=True: alpha_prev = 1 at the last step, so sigma = 0 and x_{t-1} = x_0 pred.
    # ddpo-pytorch clamps the previous timestep to 0 and would give sigma > 0 here.
    scheduler = make_scheduler(set_alpha_to_one=True)
    t_last = scheduler.timesteps[-1]
    model_output, sample, noise = tensors(0)
    out = ddim_step_logprob(scheduler, model_output, t_last, sample, eta=1.0)
    assert torch.all(out.std == 0)
    torch.testing.assert_close(
        out.prev_sample, oracle(scheduler, model_output, t_last, sample, 1.0, noise)
    )
    assert torch.all(out.log_prob == 0)

    scheduler = make_scheduler(set_alpha_to_one=False)
    out = ddim_step_logprob(scheduler, model_output, t_last, sample, eta=1.0)
    assert torch.all(out.std > 0)
    assert torch.all(torch.isfinite(out.log_prob))


def test_clip_sample_matches_and_is_active():
    model_output, sample, noise = tensors(1, scale=3.0)
    t = 981  # alpha_bar small: the predicted x_0 is far outside [-0.5, 0.5]
    clipped = make_scheduler(clip_sample=True, clip_sample_range=0.5)
    out = ddim_step_logprob(clipped, model_output, t, sample, eta=1.0)
    expected = oracle(clipped, model_output, t, sample, 1.0, noise)
    torch.testing.assert_close(mean_from_noise(out, noise), expected, rtol=1e-5, atol=1e-5)
    plain = ddim_step_logprob(make_scheduler(), model_output, t, sample, eta=1.0)
    assert not torch.allclose(out.mean, plain.mean)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_thresholding_matches_and_is_active(prediction_type):
    model_output, sample, noise = tensors(2, scale=3.0)
    t = 501
    sched = make_scheduler(
        thresholding=True,
        sample_max_value=2.0,
        dynamic_thresholding_ratio=0.9,
        prediction_type=prediction_type,
    )
    out = ddim_step_logprob(sched, model_output, t, sample, eta=0.7)
    expected = oracle(sched, model_output, t, sample, 0.7, noise)
    torch.testing.assert_close(mean_from_noise(out, noise), expected, rtol=1e-5, atol=1e-5)
    plain = make_scheduler(prediction_type=prediction_type)
    assert not torch.allclose(out.mean, ddim_step_logprob(plain, model_output, t, sample, 0.7).mean)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_batched_timesteps_match_per_row_scalar_calls(set_alpha_to_one):
    scheduler = make_scheduler(set_alpha_to_one=set_alpha_to_one)
    model_output, sample, noise = tensors(3)
    ts = torch.stack([scheduler.timesteps[0], scheduler.timesteps[4], scheduler.timesteps[-1]])
    prev = tensors(4)[2]
    batched = ddim_step_logprob(scheduler, model_output, ts, sample, eta=1.0, prev_sample=prev)
    for i in range(SHAPE[0]):
        row = ddim_step_logprob(
            scheduler,
            model_output[i : i + 1],
            int(ts[i]),
            sample[i : i + 1],
            eta=1.0,
            prev_sample=prev[i : i + 1],
        )
        torch.testing.assert_close(batched.mean[i : i + 1], row.mean)
        torch.testing.assert_close(batched.std[i : i + 1], row.std)
        torch.testing.assert_close(batched.log_prob[i : i + 1], row.log_prob)
        expected = oracle(
            scheduler, model_output[i : i + 1], ts[i], sample[i : i + 1], 1.0, noise[i : i + 1]
        )
        torch.testing.assert_close(
            mean_from_noise(batched, noise)[i : i + 1], expected, rtol=1e-5, atol=1e-5
        )
    # rows differ: the timesteps really were gathered per sample
    assert len(set(batched.std.flatten().tolist())) == 3


def test_scalar_timestep_forms_agree():
    scheduler = make_scheduler()
    model_output, sample, _ = tensors(5)
    prev = tensors(6)[2]
    t = scheduler.timesteps[3]
    outs = [
        ddim_step_logprob(scheduler, model_output, form, sample, 1.0, prev_sample=prev)
        for form in (int(t), t, t.expand(SHAPE[0]).clone())
    ]
    for other in outs[1:]:
        torch.testing.assert_close(other.log_prob, outs[0].log_prob)
        torch.testing.assert_close(other.mean, outs[0].mean)


def test_log_prob_matches_torch_normal_mean_over_dims():
    scheduler = make_scheduler()
    model_output, sample, _ = tensors(7)
    prev = tensors(8)[1]
    t = torch.stack([scheduler.timesteps[1], scheduler.timesteps[5], scheduler.timesteps[8]])
    out = ddim_step_logprob(scheduler, model_output, t, sample, eta=0.8, prev_sample=prev)
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)
    assert out.log_prob.shape == (SHAPE[0],)
    assert out.prev_sample is prev


def test_sampled_log_prob_equals_recomputation_and_generator_matches_scheduler():
    scheduler = make_scheduler()
    model_output, sample, _ = tensors(9)
    t = scheduler.timesteps[2]
    out = ddim_step_logprob(
        scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(11)
    )
    again = ddim_step_logprob(
        scheduler, model_output, t, sample, eta=1.0, prev_sample=out.prev_sample
    )
    torch.testing.assert_close(out.log_prob, again.log_prob, rtol=0, atol=0)
    expected = scheduler.step(
        model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(11)
    ).prev_sample
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
    # a different seed draws a different sample
    other = ddim_step_logprob(
        scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(12)
    )
    assert not torch.allclose(other.prev_sample, out.prev_sample)


def test_eta_zero_is_deterministic_with_zero_log_prob_and_finite_grads():
    scheduler = make_scheduler()
    model_output, sample, _ = tensors(10)
    model_output.requires_grad_(True)
    t = scheduler.timesteps[4]
    out = ddim_step_logprob(scheduler, model_output, t, sample, eta=0.0)
    expected = scheduler.step(model_output.detach(), t, sample, eta=0.0).prev_sample
    torch.testing.assert_close(out.prev_sample.detach(), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out.log_prob == 0)
    # the degenerate density is 0 even for a prev_sample off the mean
    off = ddim_step_logprob(scheduler, model_output, t, sample, 0.0, prev_sample=sample)
    assert torch.all(off.log_prob == 0)
    (out.log_prob.sum() + off.log_prob.sum()).backward()
    assert torch.all(torch.isfinite(model_output.grad))


def test_half_precision_inputs_log_prob_in_float32():
    scheduler = make_scheduler()
    model_output, sample, _ = tensors(13)
    t = scheduler.timesteps[2]
    out = ddim_step_logprob(
        scheduler,
        model_output.half(),
        t,
        sample.half(),
        1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.prev_sample.dtype == torch.float16
    assert out.log_prob.dtype == torch.float32
    again = ddim_step_logprob(
        scheduler, model_output.half(), t, sample.half(), 1.0, prev_sample=out.prev_sample
    )
    torch.testing.assert_close(out.log_prob, again.log_prob, rtol=0, atol=0)
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample.float())
    torch.testing.assert_close(out.log_prob, ref.mean(dim=(1, 2, 3)))


def test_gaussian_log_prob_oracle_and_zero_std():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    std = torch.tensor([0.5, 2.0]).reshape(2, 1, 1)
    expected = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    std0 = torch.tensor([0.0, 2.0]).reshape(2, 1, 1)
    got = gaussian_log_prob(x, mean, std0)
    assert got[0] == 0
    torch.testing.assert_close(got[1], expected[1])


def test_unset_timesteps_raise():
    scheduler = DDIMScheduler()
    model_output, sample, _ = tensors(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_logprob(scheduler, model_output, 10, sample, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_with_cpu_timesteps_and_generator_match_cpu():
    scheduler = make_scheduler()
    model_output, sample, _ = tensors(14)
    ts = torch.stack([scheduler.timesteps[0], scheduler.timesteps[5], scheduler.timesteps[-1]])
    cpu = ddim_step_logprob(
        scheduler, model_output, ts, sample, 1.0, generator=torch.Generator().manual_seed(0)
    )
    cuda = ddim_step_logprob(
        scheduler,
        model_output.cuda(),
        ts,  # timesteps stay on the CPU, as scheduler.timesteps does
        sample.cuda(),
        1.0,
        generator=torch.Generator().manual_seed(0),  # a CPU generator drives CUDA sampling
    )
    assert cuda.prev_sample.device.type == "cuda" and cuda.log_prob.device.type == "cuda"
    torch.testing.assert_close(cuda.prev_sample.cpu(), cpu.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cuda.log_prob.cpu(), cpu.log_prob, rtol=1e-5, atol=1e-5)
