"""The policy-gradient family: DDPO, TDPO and TDPO-R (docs/algorithm.md, "One epoch").

One epoch: sample trajectories -> training reward (and the evaluation panel) -> per-prompt
normalization over the global batch -> returns G_k (optional per-step KL penalty) -> advantages
-> inner epochs of PPO-clip updates. The members differ only where the paper makes them differ:

- :class:`DDPO`: ``A_k = R~`` at every step; updates accumulate over all timesteps (sample-major).
- :class:`TDPO`: a temporal critic values every state, ``A_k = G_k - V_old(k)`` normalized over
  the epoch; updates stay inside one timestep slice (slice-major) and train the critic alongside;
  neuron statistics every epoch and, with ``reset.enabled`` (TDPO-R), a periodic reset of the
  critic's active neurons.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tdpo.algos.advantages import (
    PerPromptStatTracker,
    RunningRewardStats,
    explained_variance,
    explained_variance_by_quarter,
    group_normalize,
    normalize_advantages,
    r2_by_quarter,
    returns_from_rewards,
    temporal_advantages,
)
from tdpo.algos.losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    kl_estimate,
    ppo_clip_loss,
)
from tdpo.algos.neurons import (
    dormant_overlap,
    neuron_fractions,
    neuron_masks,
    neuron_scores,
    reset_neurons,
)
from tdpo.backbones import load_image_embedder
from tdpo.critic import (
    CriticHead,
    latent_feature_dim,
    latent_state_features,
    load_tiny_decoder,
    trajectory_state_embeddings,
)
from tdpo.errors import NonFiniteRewards, UsageError
from tdpo.methods.base import Method, optimizer_step, unwrap_optimizer
from tdpo.paths import resolve_alias
from tdpo.policy import Trajectory, unwrap
from tdpo.sampling import derive_seed, sample_noise, score_images

REFERENCE_STATS_BATCH = 8  # states per process the reference code scores neurons on


@dataclass
class EpochBatch:
    """Everything the update needs from one epoch of local samples (N samples, T steps)."""

    latents: torch.Tensor  # [N, T+1, C, h, w]
    old_log_probs: torch.Tensor  # [N, T]
    timesteps: torch.Tensor  # [N, T]
    prompt_embeds: torch.Tensor  # [N, L, D]
    negative_embeds: torch.Tensor | None  # [N, L, D]
    advantages: torch.Tensor  # [N, T]
    state_embeddings: torch.Tensor | None = None  # [N, T, d] this epoch's states (tdpo)
    critic: CriticTargets | None = None  # what the critic trains on (tdpo)
    pooled_embeds: torch.Tensor | None = None  # [N, P] SDXL's pooled text embeddings
    negative_pooled: torch.Tensor | None = None  # [N, P]

    @classmethod
    def from_trajectory(cls, traj: Trajectory, advantages: torch.Tensor) -> EpochBatch:
        return cls(
            traj.latents,
            traj.log_probs,
            traj.timesteps,
            traj.prompt_embeds,
            traj.negative_embeds,
            advantages=advantages,
            pooled_embeds=traj.pooled_embeds,
            negative_pooled=traj.negative_pooled,
        )


@dataclass
class CriticTargets:
    """The critic's training data for one epoch: the states of the last ``critic.replay_epochs``
    epochs (M = that many epochs of local samples, this epoch's last), their returns G_k and
    V_old(k) (the centre of the value clip), recomputed with the critic of this epoch."""

    features: torch.Tensor  # [M, T, d]
    timesteps: torch.Tensor  # [M, T]
    returns: torch.Tensor  # [M, T]
    old_values: torch.Tensor  # [M, T]


class PolicyGradient(Method):
    """What DDPO and TDPO share: sampling, rewards, normalization, returns, PPO-clip updates."""

    slice_major: ClassVar[bool] = False  # update order: timestep slices outermost (TDPO)
    keep_x0: bool = False  # sampling records the denoiser's x0 estimate of every step

    @classmethod
    def plan_updates(cls, config, samples_per_process: int, minibatches: int):
        T = config.sample.num_steps
        updates = config.train.updates_per_epoch or 2 * T
        passes = minibatches * T
        if passes % updates:
            raise UsageError(
                "train.updates_per_epoch",
                updates,
                f"must divide the {passes} minibatch passes per epoch "
                f"({minibatches} minibatches x {T} steps)",
            )
        return updates, passes // updates, config.train.inner_epochs

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg = trainer.config
        self.tracker = PerPromptStatTracker(cfg.train.norm_buffer_size, cfg.train.norm_min_count)
        self.reward_stats = RunningRewardStats()
        k = cfg.kl
        self.use_kl = k.coef > 0
        self.kl_ctl = (
            AdaptiveKLController(k.coef, k.target, k.horizon)
            if k.adaptive
            else FixedKLController(k.coef)
        )
        self.critic: torch.nn.Module | None = None

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "kl": self.kl_ctl.state_dict(),
            "reward_stats": self.reward_stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.kl_ctl.load_state_dict(state["kl"])
        if "reward_stats" in state:  # checkpoints of earlier versions have none
            self.reward_stats.load_state_dict(state["reward_stats"])

    # -- one epoch ----------------------------------------------------------------------------

    def sample(self, epoch: int) -> tuple[Trajectory, list[str]]:
        """This process's trajectories of the epoch, and the epoch's global prompt list."""
        tr = self.trainer
        cfg, sch = tr.config, tr.schedule
        global_prompts = tr.draw_prompts()
        first = tr.first_sample
        local_prompts = global_prompts[first : first + sch.samples_per_process]
        shape = tr.policy.noise_shape
        trajectories = []
        tr.unet.eval()
        with tr.progress(
            sch.sample_batches * cfg.sample.num_steps,
            f"epoch {epoch + 1}/{cfg.train.epochs} sample",
        ) as bar:
            for b in range(sch.sample_batches):
                lo = b * cfg.sample.batch_size
                indices = range(first + lo, first + lo + cfg.sample.batch_size)
                noise = sample_noise([derive_seed(cfg.seed, 2, epoch, i) for i in indices], shape)
                with tr.accelerator.autocast():
                    traj = tr.policy.sample(
                        tr.unet,
                        local_prompts[lo : lo + cfg.sample.batch_size],
                        noise.to(tr.device),
                        with_reference=self.use_kl,
                        progress=bar,
                        keep_x0=self.keep_x0,
                    )
                trajectories.append(traj)
                tr.check_signal()
        tr.unet.train()
        return Trajectory.cat(trajectories), global_prompts

    def normalize(
        self, all_rewards: torch.Tensor, global_prompts: list[str], finite: torch.Tensor
    ) -> torch.Tensor:
        """R~ (``train.normalization``): per prompt with buffered statistics (the paper), per
        prompt within this epoch's group (GRPO), or over the batch; non-finite rewards get 0."""
        normalized = torch.zeros_like(all_rewards)
        good = all_rewards[finite]
        prompts = [p for p, ok in zip(global_prompts, finite.tolist()) if ok]
        mode = self.trainer.config.train.normalization
        if mode == "per_prompt":
            normalized[finite] = self.tracker.update(prompts, good)
        elif mode == "group":
            normalized[finite] = group_normalize(good, prompts).to(normalized.dtype)
        elif mode == "running":
            normalized[finite] = self.reward_stats.update(good)
        else:
            normalized[finite] = (good - good.mean()) / (good.std(unbiased=False) + 1e-6)
        return normalized

    def run_epoch(self, epoch: int) -> dict[str, float]:
        tr = self.trainer
        cfg, sch = tr.config, tr.schedule
        start = time.perf_counter()
        traj, global_prompts = self.sample(epoch)
        t_sample = time.perf_counter()

        # -- rewards, normalized per prompt over the global batch (every process the same) ----
        rewards, panel = tr.score(traj.images, traj.prompts)
        all_rewards = tr.gather(rewards)
        finite = torch.isfinite(all_rewards)
        nonfinite = int((~finite).sum())
        if nonfinite / len(all_rewards) > cfg.train.max_nonfinite_fraction:
            raise NonFiniteRewards(nonfinite, len(all_rewards), epoch)
        normalized_all = self.normalize(all_rewards, global_prompts, finite)
        local = slice(tr.first_sample, tr.first_sample + sch.samples_per_process)
        normalized = normalized_all[local].to(tr.device)

        # -- returns G_k, with an optional per-step KL penalty ---------------------------------
        kl = None
        if self.use_kl:
            kl = kl_estimate(traj.log_probs, traj.ref_log_probs, cfg.kl.estimator)
        returns = returns_from_rewards(normalized, cfg.sample.num_steps, kl, self.kl_ctl.value)
        batch = EpochBatch.from_trajectory(traj, advantages=returns)
        metrics = self.set_advantages(batch, traj, global_prompts, finite, local)
        t_value = time.perf_counter()
        if cfg.log.dump_tensors:
            self.dump(epoch, rewards, all_rewards, normalized_all, batch.advantages, global_prompts)

        # -- inner epochs of PPO-clip updates ------------------------------------------------------
        gen = torch.Generator().manual_seed(
            derive_seed(cfg.seed, 4, epoch, tr.accelerator.process_index)
        )
        stats: dict[str, float] = {}
        for inner in range(sch.inner_epochs):
            desc = f"epoch {epoch + 1}/{cfg.train.epochs} train {inner + 1}/{sch.inner_epochs}"
            with tr.progress(sch.minibatches * cfg.sample.num_steps, desc) as bar:
                stats = self.update(batch, gen, bar)
            tr.check_signal()
        t_train = time.perf_counter()

        metrics.update(self.after_updates(epoch, batch))
        if self.use_kl:
            mean_kl = float(tr.gather(kl.mean(dim=1)).mean())
            self.kl_ctl.update(mean_kl, cfg.sample.samples_per_epoch)
            metrics["kl"] = mean_kl
            metrics["kl_coef"] = self.kl_ctl.value
        good = all_rewards[finite]
        metrics.update(
            {
                # float64: finite rewards near 1e37 overflow a float32 sum (issue 14)
                "reward_mean": float(good.double().mean()) if len(good) else float("nan"),
                "reward_std": (
                    float(good.double().std(unbiased=False)) if len(good) else float("nan")
                ),
                "nonfinite_rewards": nonfinite,
                **panel,
                **stats,
                "seconds_sample": t_sample - start,
                "seconds_value": t_value - t_sample,
                "seconds_train": t_train - t_value,
            }
        )
        tr.save_grid(epoch + 1, traj.images, traj.prompts, rewards)
        return metrics

    def set_advantages(
        self,
        batch: EpochBatch,
        traj: Trajectory,
        global_prompts: list[str],
        finite: torch.Tensor,
        local: slice,
    ) -> dict[str, float]:
        """DDPO: A = R~ at every step (minus KL terms if enabled): the returns as they are."""
        return {}

    def after_updates(self, epoch: int, batch: EpochBatch) -> dict[str, float]:
        """Work after the epoch's updates (TDPO: neuron statistics and reset)."""
        return {}

    def update(self, batch: EpochBatch, generator: torch.Generator, progress) -> dict[str, float]:
        """One inner epoch of PPO-clip updates (docs/algorithm.md, step 6); returns mean losses
        and statistics over the passes, averaged over processes.

        Samples are shuffled, and timesteps independently per sample. Slice-major (TDPO): the
        outer loop is over timestep slices j, so every update stays inside one slice; sample-major
        (DDPO): over minibatches, accumulating over all timesteps. The optimizer steps every
        ``schedule.accumulation`` passes.
        """
        tr = self.trainer
        acc, sch, cfg = tr.accelerator, tr.schedule, tr.config
        unet, critic = tr.unet, self.critic
        n, T = batch.old_log_probs.shape
        device = batch.latents.device
        mb_size = cfg.train.batch_size
        sample_perm = torch.randperm(n, generator=generator).to(device)
        time_perm = torch.argsort(torch.rand(n, T, generator=generator), dim=1).to(device)
        if self.slice_major:
            order = [(j, m) for j in range(T) for m in range(sch.minibatches)]
        else:
            order = [(j, m) for m in range(sch.minibatches) for j in range(T)]
        use_cfg = cfg.train.cfg and tr.policy.use_cfg and batch.negative_embeds is not None
        if critic is not None:  # the critic's rows: the policy's, or drawn from its replay
            targets = batch.critic
            if len(targets.returns) == n:
                critic_perm, critic_time = sample_perm, time_perm
            else:
                critic_perm = torch.randperm(len(targets.returns), generator=generator).to(device)
                critic_time = torch.argsort(
                    torch.rand(len(targets.returns), T, generator=generator), dim=1
                ).to(device)
            critic_blocks = len(targets.returns) // mb_size

        policy_params = [p for p in unet.parameters() if p.requires_grad]
        clip_groups = [(policy_params, cfg.train.max_grad_norm)]
        if critic is not None:
            clip_groups.append((list(critic.parameters()), cfg.train.max_grad_norm))
            critic.train()
        sums: dict[str, torch.Tensor | float] = {}  # on-device sums: no host sync per pass
        for step_index, (j, m) in enumerate(order):
            rows = sample_perm[m * mb_size : (m + 1) * mb_size]
            k = time_perm[rows, j]
            is_update = (step_index + 1) % sch.accumulation == 0
            sync = contextlib.ExitStack()
            if not is_update:
                sync.enter_context(acc.no_sync(unet))
                if critic is not None:
                    sync.enter_context(acc.no_sync(critic))
            with sync, acc.autocast():
                log_prob = self.step_log_prob(unet, batch, rows, k, use_cfg)
                # L_pi = mean(max(-A rho, -A clip(rho, 1-eps, 1+eps))), rho = pi_theta / pi_old
                policy_loss, info = ppo_clip_loss(
                    log_prob,
                    batch.old_log_probs[rows, k],
                    batch.advantages[rows, k],
                    cfg.train.clip_range,
                )
                loss = policy_loss
                if critic is not None:  # block m of pass j; with no replay, the policy's rows
                    block = (j * sch.minibatches + m) % critic_blocks
                    c_rows = critic_perm[block * mb_size : (block + 1) * mb_size]
                    c_k = critic_time[c_rows, j]
                    values = critic(targets.features[c_rows, c_k], targets.timesteps[c_rows, c_k])
                    # L_V = 0.5 mean(max((V-G)^2, (clip(V, V_old +- c) - G)^2))
                    value_loss = clipped_value_loss(
                        values,
                        targets.old_values[c_rows, c_k],
                        targets.returns[c_rows, c_k],
                        cfg.critic.value_clip,
                    )
                    loss = loss + cfg.critic.value_coef * value_loss
                    _add(sums, "critic_loss", value_loss.detach())
                if cfg.kl.loss_coef > 0:  # beta * KL(pi_theta || pi_base) on this step (GRPO)
                    kl = self.kl_to_base(unet, batch, rows, k, use_cfg, log_prob)
                    loss = loss + cfg.kl.loss_coef * kl
                    _add(sums, "kl_loss", kl.detach())
                if loss.requires_grad:  # all-deterministic steps (sigma=0) carry no gradient
                    acc.backward(loss / sch.accumulation)
            if is_update:
                norms = optimizer_step(
                    unwrap_optimizer(tr.optimizer), clip_groups, getattr(acc, "scaler", None)
                )
                _add(sums, "policy_grad_norm", norms[0])
            _add(sums, "policy_loss", policy_loss.detach())
            for key in ("approx_kl", "clipfrac"):
                _add(sums, key, info[key].detach())
            if progress is not None:
                progress.update(1)
        out = {key: float(value) / len(order) for key, value in sums.items()}
        out["policy_grad_norm"] = sums.get("policy_grad_norm", 0.0) / max(1, sch.updates_per_epoch)
        # Statistics are averaged over processes (each process saw its own minibatches).
        keys = sorted(out)
        values = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
        values = acc.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def step_log_prob(self, unet, batch: EpochBatch, rows, k, use_cfg: bool) -> torch.Tensor:
        """log pi(x_{k+1} | x_k) of the stored steps ``k`` of samples ``rows`` under ``unet``."""
        return self.trainer.policy.step_log_prob(
            unet,
            batch.latents[rows, k],
            batch.latents[rows, k + 1],
            batch.timesteps[rows, k],
            batch.prompt_embeds[rows],
            batch.negative_embeds[rows] if use_cfg else None,
            _rows(batch.pooled_embeds, rows),
            _rows(batch.negative_pooled, rows) if use_cfg else None,
        )

    def kl_to_base(self, unet, batch: EpochBatch, rows, k, use_cfg: bool, log_prob):
        """``mean(estimator(log pi_theta - log pi_base))`` on the minibatch's stored steps, the
        base model (LoRA disabled) re-evaluated without gradient."""
        tr = self.trainer
        with torch.no_grad(), tr.policy.reference_mode(unet) as base:
            base_log_prob = self.step_log_prob(base, batch, rows, k, use_cfg)
        return kl_estimate(log_prob, base_log_prob, tr.config.kl.estimator).mean()

    def dump(self, epoch, rewards, all_rewards, normalized_all, advantages, prompts) -> None:
        """``log.dump_tensors``: this process's rewards and advantages of the epoch, for debugging."""
        tr = self.trainer
        out = tr.run_dir / "debug"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "local_rewards": rewards.cpu(),
                "global_rewards": all_rewards.cpu(),
                "global_normalized": normalized_all.cpu(),
                "local_advantages": advantages.cpu(),
                "global_advantages": tr.gather(advantages).cpu(),
                "global_prompts": prompts,
            },
            out / f"epoch_{epoch + 1:04d}_rank{tr.accelerator.process_index}.pt",
        )


class DDPO(PolicyGradient):
    """DDPO (Black et al., 2023): every step gets the normalized final reward."""

    name = "ddpo"

    @classmethod
    def label(cls, config) -> str:
        """DDPO-<optimizer updates per epoch>: DDPO-2, or DDPO-100 at the paper's 50 steps."""
        updates = config.train.updates_per_epoch or 2 * config.sample.num_steps
        return f"DDPO-{updates}" + _suffix(_normalization_note(config))


class GRPO(PolicyGradient):
    """GRPO (Shao et al., 2024) as Flow-GRPO (Liu et al., 2025) applies it to images: G samples per
    prompt, advantages relative to the group (``train.normalization=group``), the same advantage
    at every step, PPO-clip per step, a KL loss to the frozen base model (``kl.loss_coef``), no
    critic. Its preset ``grpo`` sets those."""

    name = "grpo"

    @classmethod
    def label(cls, config) -> str:
        notes = [] if config.train.normalization == "group" else _normalization_note(config)
        return "GRPO" + _suffix(notes)


class TDPO(PolicyGradient):
    """TDPO (and TDPO-R with ``reset.enabled``): per-timestep advantages from a temporal critic."""

    name = "tdpo"
    uses_critic = True
    slice_major = True

    @classmethod
    def label(cls, config) -> str:
        """TDPO, TDPO-R (active reset) or TDPO-reset-<target>, with what differs from the
        paper's critic and normalization in brackets, e.g. "TDPO-R (x0+prompt critic, replay 4,
        running norm)"."""
        c = config.critic
        notes = []
        if c.input != "image" or c.prompt_input:
            notes.append(f"{c.input}{'+prompt' if c.prompt_input else ''} critic")
        if c.replay_epochs > 1:
            notes.append(f"replay {c.replay_epochs}")
        notes += _normalization_note(config)
        if not config.reset.enabled:
            name = "TDPO"
        elif config.reset.target == "active":
            name = "TDPO-R"
        else:
            name = f"TDPO-reset-{config.reset.target}"
        return name + _suffix(notes)

    @classmethod
    def plan_updates(cls, config, samples_per_process: int, minibatches: int):
        updates, accumulation, inner = super().plan_updates(
            config, samples_per_process, minibatches
        )
        T = config.sample.num_steps
        if updates % T:
            raise UsageError(
                "train.updates_per_epoch",
                updates,
                f"tdpo updates within timestep slices: use a multiple of "
                f"sample.num_steps={T} that divides {minibatches * T}",
            )
        return updates, accumulation, inner

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg = trainer.config
        unet_cfg = trainer.policy.unet.config
        self.embedder = None
        if cfg.critic.input in ("image", "x0"):
            self.embedder = load_image_embedder(
                resolve_alias(cfg.critic.backbone), trainer.device, trainer.weight_dtype
            )
            in_dim, timestep_input = self.embedder.embed_dim, cfg.critic.timestep_input
        else:  # the cheap critic: pooled latents and the timestep
            in_dim = latent_feature_dim(unet_cfg.in_channels)
            timestep_input = True
        self.tiny_decoder = None  # critic.decoder=tiny: states decoded with an AutoencoderTiny
        if self.embedder is not None and cfg.critic.decoder == "tiny":
            self.tiny_decoder = load_tiny_decoder(
                cfg.critic.tiny_decoder,
                trainer.policy.vae.config.latent_channels,
                trainer.device,
                trainer.weight_dtype,
            )
        if cfg.critic.prompt_input:  # the prompt's text features (UNet or SD3 transformer width)
            in_dim += trainer.policy.text_feature_dim
        self.keep_x0 = cfg.critic.input == "x0" or cfg.log.critic_reference
        self.critic = CriticHead(
            in_dim,
            cfg.critic.head,
            timestep_input,
            trainer.policy.scheduler.config.num_train_timesteps,
            standardize=cfg.critic.standardize,
            init=cfg.critic.init,
        ).to(trainer.device)
        self.prev_dormant: list[torch.Tensor] | None = None
        self.replay: list[dict[str, torch.Tensor]] = []  # the critic's last epochs of states

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.trainer.config.critic.learning_rate
        return [{"params": list(self.critic.parameters()), "lr": lr}]

    def prepare(self, accelerator) -> None:
        self.critic = accelerator.prepare(self.critic)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["prev_dormant"] = [m.cpu() for m in self.prev_dormant] if self.prev_dormant else []
        head = unwrap(self.critic).state_dict()
        state["critic"] = {k: v.detach().cpu().clone() for k, v in head.items()}
        state["critic_replay"] = [{k: v.cpu() for k, v in e.items()} for e in self.replay]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        unwrap(self.critic).load_state_dict(state["critic"])
        device = self.trainer.device
        self.prev_dormant = [m.to(device) for m in state["prev_dormant"]] or None
        replay = state.get("critic_replay", [])  # absent in checkpoints of earlier versions
        self.replay = [{k: v.to(device) for k, v in e.items()} for e in replay]

    def save_final(self, directory) -> None:
        from safetensors.torch import save_file  # deferred: only when a run finishes

        state = unwrap(self.critic).state_dict()
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(directory / "critic_head.safetensors"),
        )

    def state_features(self, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the critic sees of the T states before each step, [N, T, d], and (with
        ``log.critic_reference``) the training reward of each step's x0 estimate, [N, T]."""
        cfg = self.trainer.config
        n, T = traj.log_probs.shape
        features = reference = None
        if cfg.critic.input == "latent":
            features = latent_state_features(traj.latents[:, :-1])
        elif cfg.critic.input == "image":  # x_T ... x_1, the states before each step
            with self.trainer.accelerator.autocast():
                features = trajectory_state_embeddings(
                    self.state_decoder(),
                    self.embedder,
                    traj.latents[:, :-1],
                    cfg.critic.embed_batch_size,
                )
        if cfg.critic.input == "x0" or cfg.log.critic_reference:
            embedded, reference = self.x0_features(
                traj, embed=cfg.critic.input == "x0", score=cfg.log.critic_reference
            )
            features = embedded if cfg.critic.input == "x0" else features
        if cfg.critic.prompt_input:
            text = F.normalize(traj.prompt_embeds.float().mean(dim=1), dim=-1)  # [N, D]
            features = torch.cat([features, text[:, None].expand(n, T, -1)], dim=-1)
        return features, reference

    @torch.no_grad()
    def x0_features(
        self, traj: Trajectory, embed: bool, score: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each step's x0 estimate decoded once (in batches) and, as asked, embedded for the
        critic [N, T, d] and scored with the training reward [N, T] (the critic's reference)."""
        tr = self.trainer
        n, T = traj.log_probs.shape
        states = traj.x0_preds.reshape(n * T, *traj.x0_preds.shape[2:])
        prompts = [p for p in traj.prompts for _ in range(T)]
        size = tr.config.critic.embed_batch_size
        embeddings, rewards = [], []
        for lo in range(0, n * T, size):
            chunk_states = states[lo : lo + size]
            with tr.accelerator.autocast():
                images = (self.state_decoder() if embed else tr.policy.decode)(chunk_states)
                if embed:
                    embeddings.append(self.embedder(images).float())
                if score and embed and self.tiny_decoder is not None:  # the reward sees the VAE's
                    images = tr.policy.decode(chunk_states)
            if score:
                chunk = prompts[lo : lo + size]
                rewards.append(score_images({"r": tr.reward_fn}, images, chunk)["r"])
        return (
            torch.cat(embeddings).view(n, T, -1) if embed else None,
            torch.cat(rewards).to(tr.device).view(n, T) if score else None,
        )

    def state_decoder(self):
        """How valuing decodes states to images: the tiny autoencoder (``critic.decoder=tiny``)
        or the pipeline's VAE."""
        return self.tiny_decoder if self.tiny_decoder is not None else self.trainer.policy.decode

    def set_advantages(
        self,
        batch: EpochBatch,
        traj: Trajectory,
        global_prompts: list[str],
        finite: torch.Tensor,
        local: slice,
    ) -> dict[str, float]:
        """V_old for every state; A_k = G_k - V_old(k), normalized over all samples and steps of
        all processes; non-finite rewards are left out (advantage 0, no critic signal).

        Logs ``critic_ev`` (all steps) and ``critic_ev/q1..q4`` (quarters of the steps, q4 nearest
        the image): the share of the return's variance that V_old explains on this epoch's fresh
        samples (1 perfect, 0 no better than a constant); with ``log.critic_reference`` also
        ``critic_ref/q1..q4``, the share that the training reward of the denoiser's own x0
        estimate explains (centred and scaled per prompt when the target is prompt-relative:
        ``train.normalization`` per_prompt or group)."""
        tr = self.trainer
        embeddings, reference = self.state_features(traj)
        unwrap(self.critic).update_statistics(tr.gather(embeddings), tr.gather(batch.timesteps))
        self.critic.eval()
        with torch.no_grad():
            old_values = self.critic(embeddings, batch.timesteps)
        returns = batch.advantages
        advantages_all = tr.gather(temporal_advantages(returns, old_values))
        advantages_all[finite] = normalize_advantages(advantages_all[finite])
        advantages_all[~finite] = 0.0
        batch.advantages = advantages_all[local]
        local_finite = finite[local].to(tr.device)
        returns = torch.where(local_finite[:, None], returns, old_values)  # no signal if not finite
        batch.state_embeddings = embeddings
        batch.critic = self.critic_targets(embeddings, batch.timesteps, returns, old_values)
        values_all = tr.gather(old_values)[finite]
        returns_all = tr.gather(returns)[finite]
        metrics = {
            "critic_ev": explained_variance(values_all, returns_all),
            "value_mean": float(tr.gather(old_values).mean()),
        }
        for q, ev in explained_variance_by_quarter(values_all, returns_all).items():
            metrics[f"critic_ev/{q}"] = ev
        if reference is not None:
            ref_all = tr.gather(reference)[finite]
            prompts = [p for p, ok in zip(global_prompts, finite.tolist()) if ok]
            if tr.config.train.normalization in ("per_prompt", "group"):  # prompt-relative
                ref_all = torch.stack(
                    [group_normalize(ref_all[:, k], prompts) for k in range(ref_all.shape[1])], 1
                )
            for q, r2 in r2_by_quarter(ref_all, returns_all).items():
                metrics[f"critic_ref/{q}"] = r2
        return metrics

    def critic_targets(
        self,
        features: torch.Tensor,
        timesteps: torch.Tensor,
        returns: torch.Tensor,
        old_values: torch.Tensor,
    ) -> CriticTargets:
        """This epoch's states joined to the last ``critic.replay_epochs - 1`` epochs' (kept on
        the device): the critic fits more prompts and images than one epoch holds, so V_old
        generalizes to the next epoch's new prompts (docs/results/mechanism.md). The policy's
        advantages always use V_old of this epoch's states only."""
        fresh = {"features": features, "timesteps": timesteps, "returns": returns}
        self.replay = (self.replay + [fresh])[-self.trainer.config.critic.replay_epochs :]
        if len(self.replay) == 1:
            return CriticTargets(**fresh, old_values=old_values)
        joined = {key: torch.cat([epoch[key] for epoch in self.replay]) for key in fresh}
        with torch.no_grad():
            joined_old = self.critic(joined["features"], joined["timesteps"])
        return CriticTargets(**joined, old_values=joined_old)

    def after_updates(self, epoch: int, batch: EpochBatch) -> dict[str, float]:
        return self.neurons(epoch, batch.state_embeddings, batch.timesteps)

    def neurons(
        self, epoch: int, embeddings: torch.Tensor, timesteps: torch.Tensor
    ) -> dict[str, float]:
        """Score the critic head's neurons on gathered state embeddings (every epoch); reset
        them every ``reset.every`` epochs when ``reset.enabled`` (TDPO-R: the active ones)."""
        tr = self.trainer
        cfg = tr.config.reset
        n, T = embeddings.shape[:2]
        gen = torch.Generator().manual_seed(derive_seed(tr.config.seed, 5, epoch))
        per_process = max(1, math.ceil(cfg.stats_batch_size / tr.accelerator.num_processes))
        pick = torch.randint(0, n * T, (per_process,), generator=gen).to(embeddings.device)
        flat_emb = embeddings.reshape(n * T, -1)[pick]
        flat_t = timesteps.reshape(n * T)[pick]
        head = unwrap(self.critic)
        features = head.features(flat_emb, flat_t)
        inputs = tr.gather(features)[: cfg.stats_batch_size]
        scores = neuron_scores(head.mlp, inputs)
        dormant, active = neuron_masks(scores, cfg.tau)
        dormant_frac, active_frac = neuron_fractions(dormant)
        # The reference code scores REFERENCE_STATS_BATCH states per process: dormancy depends
        # strongly on how many inputs score a neuron (0 % at 256 is 7 % at 8 for a fresh head).
        small = tr.gather(features[:REFERENCE_STATS_BATCH])
        small_dormant, _ = neuron_masks(neuron_scores(head.mlp, small), cfg.tau)
        out = {
            "dormant_fraction": dormant_frac,
            "active_fraction": active_frac,
            f"dormant_fraction/b{REFERENCE_STATS_BATCH}": neuron_fractions(small_dormant)[0],
            "dormant_overlap": dormant_overlap(self.prev_dormant, dormant),
            "neurons_reset": 0,
        }
        self.prev_dormant = dormant
        last_epoch = epoch + 1 == tr.config.train.epochs  # a reset then would train nothing
        if cfg.enabled and (epoch + 1) % cfg.every == 0 and not last_epoch:
            masks = {
                "active": active,
                "dormant": dormant,
                "all": [torch.ones_like(m) for m in dormant],
            }[cfg.target]
            out["neurons_reset"] = reset_neurons(
                head.mlp,
                masks,
                head.weight_std,
                optimizer=unwrap_optimizer(tr.optimizer),
                outgoing=cfg.outgoing,
                generator=torch.Generator().manual_seed(derive_seed(tr.config.seed, 6, epoch)),
            )
        return out


def _normalization_note(config) -> list[str]:
    mode = config.train.normalization
    return [] if mode == "per_prompt" else [f"{mode} norm"]


def _suffix(notes: list[str]) -> str:
    return f" ({', '.join(notes)})" if notes else ""


def _rows(tensor: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


def _add(sums: dict, key: str, value) -> None:
    sums[key] = sums.get(key, 0.0) + value
