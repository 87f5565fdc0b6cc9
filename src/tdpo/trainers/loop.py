"""The training loop shared by TDPO, TDPO-R and DDPO: a thin owner of state.

One epoch (algorithm.md): sample -> reward (training reward and evaluation panel) -> per-prompt
normalization over the global batch -> returns, critic values and temporal advantages (tdpo) ->
inner PPO updates -> neuron statistics and periodic reset (tdpo-r) -> metrics -> checkpoint.
Everything computed lives in ``tdpo.algos`` or ``tdpo.trainers.update``; this class only owns the
Accelerator, models, optimizer, RNG, logging and checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from tdpo import checkpoint as ckpt
from tdpo.algos.advantages import (
    PerPromptStatTracker,
    explained_variance,
    normalize_advantages,
    returns_from_rewards,
    temporal_advantages,
)
from tdpo.algos.losses import AdaptiveKLController, FixedKLController, kl_estimate
from tdpo.algos.neurons import (
    dormant_overlap,
    neuron_fractions,
    neuron_masks,
    neuron_scores,
    reset_neurons,
)
from tdpo.config import (
    RESUME_MUTABLE_PREFIXES,
    Config,
    flatten,
    resolve_schedule,
    to_dict,
    write_run_config,
)
from tdpo.errors import TrainingError, UsageError
from tdpo.evaluation import evaluate_policy, parse_prompt_sets
from tdpo.images import save_grid
from tdpo.policy import (
    DiffusionPolicy,
    Trajectory,
    _unwrap,
    check_pipeline_path,
    resolve_alias,
)
from tdpo.prompts import PromptSampler, load_prompts
from tdpo.rewards import build_reward, check_reward_name
from tdpo.tracking import RunLogger, truncate_metrics
from tdpo.trainers.update import EpochBatch, run_updates

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class NonFiniteRewards(TrainingError):
    """Too many NaN/inf training rewards in one epoch: stop (the last checkpoint is intact)."""

    def __init__(self, count: int, total: int, epoch: int):
        self.count, self.total, self.epoch = count, total, epoch
        super().__init__(
            f"{count} of {total} training rewards were NaN or infinite in epoch "
            f"{epoch + 1} (more than train.max_nonfinite_fraction); check the reward "
            "model, or raise train.max_nonfinite_fraction"
        )


class Interrupted(Exception):
    """Raised inside the loop after SIGINT/SIGTERM, once state is safe to checkpoint."""

    def __init__(self, signum: int):
        self.signum = signum


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, runs and Python versions)."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Per-sample noise [B, *shape], each row from its own seed: the same sample gets the same
    noise whatever the batch size or number of processes."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def check_reward_output(name: str, rewards: Any, batch: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor):
        raise UsageError(
            "reward.name",
            name,
            f"the reward returned {type(rewards).__name__}, "
            "not a tensor; return (rewards [B] tensor, info dict)",
        )
    if rewards.shape != (batch,):
        raise UsageError(
            "reward.name",
            name,
            f"the reward returned shape {tuple(rewards.shape)} "
            f"for {batch} images; return one value per image, shape [{batch}]",
        )
    return rewards.detach().float()


class Trainer:
    """Fine-tunes a diffusion policy with TDPO(-R) or DDPO under Accelerate."""

    def __init__(self, config: Config, run_dir: Path, resume: bool = False, log=print):
        self.config = config
        self.run_dir = Path(run_dir)
        self.log = log
        # A fresh AcceleratorState per trainer, so several runs can share a process (sweeps,
        # notebooks) with different mixed precision; the process group (PartialState) stays.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        # cpu=True without CUDA: several processes then form a gloo (MULTI_CPU) group.
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[config.mixed_precision],
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.device = acc.device
        # -- checks that load nothing --------------------------------------------------------
        self.schedule = resolve_schedule(config, acc.num_processes)
        check_pipeline_path(config.model.pretrained)
        check_reward_name(config.reward.name)
        for i, name in enumerate(config.reward.panel):
            check_reward_name(name, field=f"reward.panel[{i}]")
        self.prompts = load_prompts(config.prompts.train)
        self.eval_sets = (
            parse_prompt_sets(config.eval.prompt_sets, config.eval.prompts_per_set)
            if config.eval.every
            else {}
        )
        for i, name in enumerate(config.eval.rewards):
            check_reward_name(name, field=f"eval.rewards[{i}]")
        self.is_tdpo = config.train.algorithm == "tdpo"
        self.use_kl = config.kl.coef > 0
        # -- models (LoRA and critic initialization drawn from the run's seed) ----------------
        torch.manual_seed(derive_seed(config.seed, 0))
        weight_dtype = torch.float32
        if self.device.type == "cuda" and config.mixed_precision != "fp32":
            weight_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
        self.policy = DiffusionPolicy.from_config(config.model, config.sample, weight_dtype)
        self.policy.to(self.device)
        if config.train.algorithm == "alignprop" and config.train.gradient_checkpointing:
            self.policy.unet.enable_gradient_checkpointing()
        if self.use_kl:
            self.policy.enable_kl_reference()
        self.reward_fn = build_reward(config.reward.name, self.device)
        self.panel = {
            name: build_reward(name, self.device, field=f"reward.panel[{i}]")
            for i, name in enumerate(config.reward.panel)
        }
        self.eval_rewards = {config.reward.name: self.reward_fn, **self.panel}
        for i, name in enumerate(config.eval.rewards):
            if name not in self.eval_rewards:
                self.eval_rewards[name] = build_reward(
                    name, self.device, field=f"eval.rewards[{i}]"
                )
        if config.eval.rewards:
            self.eval_rewards = {name: self.eval_rewards[name] for name in config.eval.rewards}
        params = [{"params": self.policy.trainable_parameters(), "lr": config.train.learning_rate}]
        self.embedder = self.critic = None
        if self.is_tdpo:
            from tdpo.critic import CriticHead, latent_feature_dim

            if config.critic.input == "image":
                from tdpo.backbones import load_image_embedder

                self.embedder = load_image_embedder(
                    resolve_alias(config.critic.backbone), self.device, weight_dtype
                )
                in_dim, timestep_input = self.embedder.embed_dim, config.critic.timestep_input
            else:  # the cheap critic: pooled latents and the timestep
                in_dim = latent_feature_dim(self.policy.unet.config.in_channels)
                timestep_input = True
            self.critic = CriticHead(
                in_dim,
                config.critic.head,
                timestep_input,
                self.policy.scheduler.config.num_train_timesteps,
            ).to(self.device)
            params.append(
                {"params": list(self.critic.parameters()), "lr": config.critic.learning_rate}
            )
        t = config.train
        self.optimizer = torch.optim.AdamW(
            params, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_eps
        )
        if self.critic is not None:
            self.unet, self.critic, self.optimizer = acc.prepare(
                self.policy.unet, self.critic, self.optimizer
            )
        else:
            self.unet, self.optimizer = acc.prepare(self.policy.unet, self.optimizer)
        # -- state ----------------------------------------------------------------------------
        self.tracker = PerPromptStatTracker(t.norm_buffer_size, t.norm_min_count)
        k = config.kl
        self.kl_ctl = (
            AdaptiveKLController(k.coef, k.target, k.horizon)
            if k.adaptive
            else FixedKLController(k.coef)
        )
        self.prompt_sampler = PromptSampler(self.prompts, derive_seed(config.seed, 1))
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.reward_queries = 0
        self.prev_dormant: list[torch.Tensor] | None = None
        self.config_hash = ckpt.config_hash(
            {
                key: value
                for key, value in flatten(to_dict(config)).items()
                if not key.startswith(RESUME_MUTABLE_PREFIXES)
            }
        )
        self.best_monitor: float | None = None
        self.evals_since_best = 0
        self._signal: int | None = None
        self._snapshot: dict | None = None
        if resume:
            self.restore()
        self.logger = RunLogger(
            self.run_dir,
            tensorboard=config.log.tensorboard,
            wandb=config.log.wandb,
            wandb_project=config.log.wandb_project,
            config=to_dict(config),
            enabled=self.is_main,
        )

    # ---------------------------------------------------------------------------------------
    # State and checkpoints

    def state_dict(self) -> dict[str, Any]:
        unet = _unwrap(self.unet)
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "reward_queries": self.reward_queries,
            "num_processes": self.accelerator.num_processes,
            "policy": {
                n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad
            },
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict(),
            "kl": self.kl_ctl.state_dict(),
            "prompt_sampler": self.prompt_sampler.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "prev_dormant": [m.cpu() for m in self.prev_dormant] if self.prev_dormant else [],
            "best_monitor": self.best_monitor,
            "evals_since_best": self.evals_since_best,
        }
        if self.critic is not None:
            state["critic"] = {
                k: v.detach().cpu().clone() for k, v in _unwrap(self.critic).state_dict().items()
            }
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unet = _unwrap(self.unet)
        named = dict(unet.named_parameters())
        with torch.no_grad():
            for name, value in state["policy"].items():
                named[name].copy_(value.to(named[name].device))
        if self.critic is not None:
            _unwrap(self.critic).load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.kl_ctl.load_state_dict(state["kl"])
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        ckpt.restore_rng_state(state["rng"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        self.prev_dormant = [m.to(self.device) for m in state["prev_dormant"]] or None
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.reward_queries = int(state["reward_queries"])
        self.best_monitor = state.get("best_monitor")
        self.evals_since_best = int(state.get("evals_since_best", 0))

    def restore(self) -> None:
        found = ckpt.load_latest_checkpoint(
            self.run_dir, log=self.log if self.is_main else (lambda _: None)
        )
        if found is None:
            raise UsageError(
                "--resume",
                str(self.run_dir),
                "no valid checkpoint in this run directory; start a new run instead",
            )
        path, state = found
        manifest = ckpt.read_manifest(path)
        if manifest.get("config_hash") != self.config_hash:
            raise UsageError(
                "--resume",
                str(self.run_dir),
                "the checkpoint was written with "
                "a different configuration; resume with the run's own config.yaml",
            )
        if int(state.get("num_processes", 1)) != self.accelerator.num_processes:
            raise UsageError(
                "--resume",
                str(self.run_dir),
                f"the run used {state['num_processes']} processes; resume it with "
                f"the same number (this launch has {self.accelerator.num_processes})",
            )
        self.load_state_dict(state)
        if self.is_main:
            truncate_metrics(self.run_dir, self.epoch)
            self.log(f"resumed {self.run_dir} from {path.name} (epoch {self.epoch})")

    def save(self, state: dict[str, Any] | None = None) -> None:
        state = state if state is not None else self.state_dict()
        if self.is_main:
            ckpt.save_checkpoint(
                self.run_dir,
                int(state["epoch"]),
                state,
                self.config.checkpoint.keep,
                self.config_hash,
            )
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------------------------------
    # Signals: stop at the next safe point, checkpoint the last completed epoch, exit.

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._signal = signum
        if signum == signal.SIGINT:  # a second Ctrl-C exits at once (checkpoints are atomic)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _check_signal(self) -> None:
        if self._signal is not None:
            raise Interrupted(self._signal)

    # ---------------------------------------------------------------------------------------
    # One epoch

    def _progress(self, total: int, desc: str):
        enabled = self.is_main and self.config.log.progress and sys.stderr.isatty()
        return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.contiguous())

    def draw_prompts(self) -> list[str]:
        """The epoch's global prompt list: independent draws, or k prompts each repeated."""
        s = self.config.sample
        if not s.prompts_per_epoch:
            return self.prompt_sampler.sample(s.samples_per_epoch)
        repeats = s.samples_per_epoch // s.prompts_per_epoch
        return [p for p in self.prompt_sampler.sample(s.prompts_per_epoch) for _ in range(repeats)]

    def sample_epoch(self, epoch: int) -> tuple[Trajectory, list[int]]:
        cfg, sch, acc = self.config, self.schedule, self.accelerator
        global_prompts = self.draw_prompts()
        first = acc.process_index * sch.samples_per_process
        local_prompts = global_prompts[first : first + sch.samples_per_process]
        unet = self.policy.unet
        shape = (
            cfg.sample.num_steps + 1,
            unet.config.in_channels,
            unet.config.sample_size,
            unet.config.sample_size,
        )
        trajectories = []
        self.unet.eval()
        with self._progress(
            sch.sample_batches * cfg.sample.num_steps, f"epoch {epoch} sample"
        ) as bar:
            for b in range(sch.sample_batches):
                lo = b * cfg.sample.batch_size
                indices = range(first + lo, first + lo + cfg.sample.batch_size)
                noise = sample_noise([derive_seed(cfg.seed, 2, epoch, i) for i in indices], shape)
                with self.accelerator.autocast():
                    traj = self.policy.sample(
                        self.unet,
                        local_prompts[lo : lo + cfg.sample.batch_size],
                        noise.to(self.device),
                        with_reference=self.use_kl,
                        progress=bar,
                    )
                trajectories.append(traj)
                self._check_signal()
        self.unet.train()
        return Trajectory.cat(trajectories), global_prompts

    def score(self, traj: Trajectory) -> tuple[torch.Tensor, dict[str, float]]:
        """Training reward per local sample, and global means of the evaluation panel."""
        n = len(traj.prompts)
        meta = [{} for _ in range(n)]
        with torch.no_grad():
            raw, _info = self.reward_fn(traj.images, traj.prompts, meta)
            rewards = check_reward_output(self.config.reward.name, raw, n).to(self.device)
            panel = {}
            for name, fn in self.panel.items():
                values = check_reward_output(name, fn(traj.images, traj.prompts, meta)[0], n)
                panel[f"panel/{name}"] = float(self._gather(values.to(self.device)).mean())
        return rewards, panel

    def epoch_step(self, epoch: int) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, 3, epoch, acc.process_index))  # dropout
        if cfg.train.algorithm == "alignprop":
            from tdpo.trainers.alignprop import alignprop_epoch

            return alignprop_epoch(self, epoch)
        traj, global_prompts = self.sample_epoch(epoch)
        t_sample = time.perf_counter()

        # -- rewards, normalized per prompt over the global batch (every process the same) ----
        rewards, panel = self.score(traj)
        all_rewards = self._gather(rewards)
        finite = torch.isfinite(all_rewards)
        nonfinite = int((~finite).sum())
        if nonfinite / len(all_rewards) > cfg.train.max_nonfinite_fraction:
            raise NonFiniteRewards(nonfinite, len(all_rewards), epoch)
        normalized_all = torch.zeros_like(all_rewards)  # non-finite samples: advantage 0
        finite_prompts = [p for p, ok in zip(global_prompts, finite.tolist()) if ok]
        good = all_rewards[finite]
        if cfg.train.per_prompt_normalization:
            normalized_all[finite] = self.tracker.update(finite_prompts, good)
        else:
            normalized_all[finite] = (good - good.mean()) / (good.std(unbiased=False) + 1e-6)
        sch = self.schedule
        first = acc.process_index * sch.samples_per_process
        local_finite = finite[first : first + sch.samples_per_process].to(self.device)
        normalized = normalized_all[first : first + sch.samples_per_process].to(self.device)

        # -- returns G_k, with an optional per-step KL penalty ---------------------------------
        T = cfg.sample.num_steps
        kl = None
        if self.use_kl:
            kl = kl_estimate(traj.log_probs, traj.ref_log_probs, cfg.kl.estimator)
        returns = returns_from_rewards(normalized, T, kl, self.kl_ctl.value)
        metrics: dict[str, float] = {}
        batch = EpochBatch(
            traj.latents,
            traj.log_probs,
            traj.timesteps,
            traj.prompt_embeds,
            traj.negative_embeds,
            advantages=returns,
            pooled_embeds=traj.pooled_embeds,
            negative_pooled=traj.negative_pooled,
        )

        # -- temporal critic: V_old for every state, A_k = G_k - V_old(k), normalized globally -
        if self.is_tdpo:
            from tdpo.critic import latent_state_features, trajectory_state_embeddings

            if cfg.critic.input == "image":
                with acc.autocast():
                    embeddings = trajectory_state_embeddings(
                        self.policy.decode, self.embedder, traj.latents, cfg.critic.embed_batch_size
                    )
            else:
                embeddings = latent_state_features(traj.latents[:, :-1])
            critic = self.critic
            critic.eval()
            with torch.no_grad():
                old_values = critic(embeddings, traj.timesteps)
            # A_k = G_k - V_old(k), normalized over all samples and steps of all processes
            advantages_all = self._gather(temporal_advantages(returns, old_values))
            advantages_all[finite] = normalize_advantages(advantages_all[finite])
            advantages_all[~finite] = 0.0  # non-finite rewards: left out of the update
            batch.advantages = advantages_all[first : first + sch.samples_per_process]
            returns = torch.where(local_finite[:, None], returns, old_values)  # no critic signal
            batch.returns, batch.old_values, batch.state_embeddings = (
                returns,
                old_values,
                embeddings,
            )
            metrics["critic_ev"] = explained_variance(
                self._gather(old_values)[finite], self._gather(returns)[finite]
            )
            metrics["value_mean"] = float(self._gather(old_values).mean())
        else:
            batch.advantages = returns  # DDPO: A = R~ at every step (minus KL terms if enabled)
        t_value = time.perf_counter()
        if cfg.log.dump_tensors:
            self._dump(
                epoch, rewards, all_rewards, normalized_all, batch.advantages, global_prompts
            )

        # -- inner epochs of PPO-clip updates ------------------------------------------------------
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 4, epoch, acc.process_index))
        passes = sch.minibatches * T
        stats: dict[str, float] = {}
        for inner in range(cfg.train.inner_epochs):
            with self._progress(
                passes, f"epoch {epoch} train {inner + 1}/{cfg.train.inner_epochs}"
            ) as bar:
                stats = run_updates(
                    accelerator=acc,
                    policy=self.policy,
                    unet=self.unet,
                    critic=self.critic,
                    optimizer=self.optimizer,
                    batch=batch,
                    algorithm=cfg.train.algorithm,
                    schedule=sch,
                    train_cfg=cfg.train,
                    critic_cfg=cfg.critic,
                    generator=gen,
                    use_cfg=cfg.train.cfg and self.policy.use_cfg,
                    progress=bar,
                )
            self.global_step += sch.updates_per_epoch
            self._check_signal()
        t_train = time.perf_counter()

        # -- neuron statistics (every epoch) and reset of the critic (TDPO-R) -------------------
        if self.is_tdpo:
            metrics.update(self.neurons(epoch, batch.state_embeddings, traj.timesteps))
        if self.use_kl:
            mean_kl = float(self._gather(kl.mean(dim=1)).mean())
            self.kl_ctl.update(mean_kl, cfg.sample.samples_per_epoch)
            metrics["kl"] = mean_kl
            metrics["kl_coef"] = self.kl_ctl.value

        self.reward_queries += cfg.sample.samples_per_epoch
        metrics.update(
            {
                "epoch": epoch + 1,
                "reward_queries": self.reward_queries,
                "reward_mean": float(good.mean()) if len(good) else float("nan"),
                "reward_std": float(good.std(unbiased=False)) if len(good) else float("nan"),
                "nonfinite_rewards": nonfinite,
                **panel,
                **stats,
                "seconds": time.perf_counter() - start,
                "seconds_sample": t_sample - start,
                "seconds_value": t_value - t_sample,
                "seconds_train": t_train - t_value,
            }
        )
        if self.is_main and cfg.log.grid_every and (epoch + 1) % cfg.log.grid_every == 0:
            self._save_grid(epoch + 1, traj, rewards)
        return metrics

    def neurons(
        self, epoch: int, embeddings: torch.Tensor, timesteps: torch.Tensor
    ) -> dict[str, float]:
        """Score the critic head's neurons on gathered state embeddings; reset every F epochs."""
        cfg = self.config.reset
        n, T = embeddings.shape[:2]
        gen = torch.Generator().manual_seed(derive_seed(self.config.seed, 5, epoch))
        per_process = max(1, math.ceil(cfg.stats_batch_size / self.accelerator.num_processes))
        pick = torch.randint(0, n * T, (per_process,), generator=gen).to(embeddings.device)
        flat_emb = embeddings.reshape(n * T, -1)[pick]
        flat_t = timesteps.reshape(n * T)[pick]
        head = _unwrap(self.critic)
        inputs = self._gather(head.features(flat_emb, flat_t))[: cfg.stats_batch_size]
        scores = neuron_scores(head.mlp, inputs)
        dormant, active = neuron_masks(scores, cfg.tau)
        dormant_frac, active_frac = neuron_fractions(dormant)
        out = {
            "dormant_fraction": dormant_frac,
            "active_fraction": active_frac,
            "dormant_overlap": dormant_overlap(self.prev_dormant, dormant),
            "neurons_reset": 0,
        }
        self.prev_dormant = dormant
        if cfg.enabled and (epoch + 1) % cfg.every == 0:
            masks = {
                "active": active,
                "dormant": dormant,
                "all": [torch.ones_like(m) for m in dormant],
            }[cfg.target]
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            out["neurons_reset"] = reset_neurons(
                head.mlp,
                masks,
                head.weight_std,
                optimizer=optimizer,
                outgoing=cfg.outgoing,
                generator=torch.Generator().manual_seed(derive_seed(self.config.seed, 6, epoch)),
            )
        return out

    def _save_grid(self, epoch: int, traj: Trajectory, rewards: torch.Tensor) -> None:
        count = min(16, len(traj.prompts))
        captions = [
            f"{p}\n{self.config.reward.name} = {r:.3f}"
            for p, r in zip(traj.prompts[:count], rewards[:count].tolist())
        ]
        path = save_grid(
            traj.images[:count].cpu(), captions, self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        )
        self.logger.log_image("samples", path, epoch)

    def _dump(self, epoch, rewards, all_rewards, normalized_all, advantages, prompts) -> None:
        out = self.run_dir / "debug"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "local_rewards": rewards.cpu(),
                "global_rewards": all_rewards.cpu(),
                "global_normalized": normalized_all.cpu(),
                "local_advantages": advantages.cpu(),
                "global_advantages": self._gather(advantages).cpu(),
                "global_prompts": prompts,
            },
            out / f"epoch_{epoch + 1:04d}_rank{self.accelerator.process_index}.pt",
        )

    # ---------------------------------------------------------------------------------------

    def write_config(self) -> None:
        if self.is_main:
            write_run_config(self.config, self.run_dir)

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation on the main process; updates the over-optimization monitor."""
        cfg = self.config.eval
        metrics: dict[str, float] = {}
        if self.is_main:
            unet = _unwrap(self.unet)
            with_kl = self.config.model.finetune == "lora" or self.policy.reference_unet is not None
            metrics, grids = evaluate_policy(
                self.policy,
                unet,
                self.eval_sets,
                self.eval_rewards,
                cfg.seeds_per_prompt,
                self.config.seed,
                cfg.batch_size,
                embedder=self.embedder,
                with_kl=with_kl,
            )
            for label, (images, captions) in grids.items():
                path = self.run_dir / "samples" / f"eval_{label}_epoch_{self.epoch:04d}.png"
                save_grid(images[:32], captions[:32], path)
                self.logger.log_image(f"eval/{label}", path, self.epoch)
            if cfg.monitor is not None:
                if cfg.monitor not in metrics:
                    raise UsageError(
                        "eval.monitor",
                        cfg.monitor,
                        f"not an eval metric of this run; choose one of "
                        f"{', '.join(sorted(metrics))}",
                    )
                value = metrics[cfg.monitor]
                if self.best_monitor is None or value > self.best_monitor:
                    self.best_monitor, self.evals_since_best = value, 0
                    self.policy.save_final(self.run_dir / "best")
                    (self.run_dir / "best" / "epoch.txt").write_text(f"{self.epoch} {value}\n")
                else:
                    self.evals_since_best += 1
        shared = [self.best_monitor, self.evals_since_best]
        from accelerate.utils import broadcast_object_list

        if self.accelerator.num_processes > 1:
            broadcast_object_list(shared)
        self.best_monitor, self.evals_since_best = shared
        self.accelerator.wait_for_everyone()
        return metrics

    def _should_stop_early(self) -> bool:
        patience = self.config.eval.patience
        return bool(patience and self.config.eval.monitor and self.evals_since_best >= patience)

    def train(self) -> int:
        """Run the remaining epochs; returns the exit code (0, or 128 + signal number)."""
        cfg = self.config
        self.write_config()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._mid_epoch = False
        try:
            if cfg.eval.every and self.epoch == 0:  # the base model, as a reference point
                self.logger.log({"epoch": 0, "reward_queries": 0, **self.evaluate()}, step=0)
            while self.epoch < cfg.train.epochs and not self._should_stop_early():
                # A consistent state to checkpoint if a signal arrives mid-epoch.
                saved = self.latest_saved_epoch() == self.epoch
                self._snapshot = None if saved else self.state_dict()
                self._mid_epoch = True
                metrics = self.epoch_step(self.epoch)
                self.epoch += 1
                self._mid_epoch = False
                if cfg.eval.every and self.epoch % cfg.eval.every == 0:
                    metrics.update(self.evaluate())
                self.logger.log(metrics, step=self.epoch)
                if self.is_main:
                    self.log(self._summary(metrics))
                if self.epoch % cfg.checkpoint.every == 0 or self.epoch == cfg.train.epochs:
                    self.save()
                self._check_signal()
            if self._should_stop_early() and self.is_main:
                self.log(
                    f"early stop: {cfg.eval.monitor} did not improve for "
                    f"{cfg.eval.patience} evaluations (best {self.best_monitor:.4f}, "
                    f"LoRA in {self.run_dir / 'best'})"
                )
                self.save()
            self.save_final()
            return 0
        except Interrupted as stop:
            if self.latest_saved_epoch() != self.epoch or self._mid_epoch:
                if not self._mid_epoch:
                    self.save()  # between epochs: the current state is consistent
                elif self._snapshot is not None:
                    self.save(self._snapshot)  # mid-epoch: the state this epoch started from
            if self.is_main:
                self.log(
                    f"stopped by signal {stop.signum}; latest checkpoint: epoch "
                    f"{max(self.latest_saved_epoch(), 0)}; resume with: "
                    f"tdpo train --resume {self.run_dir}"
                )
            return 128 + stop.signum
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()

    def save_final(self) -> None:
        """final/: the LoRA in diffusers format (or the UNet) and the critic head."""
        if self.is_main:
            self.policy.save_final(self.run_dir / "final")
            if self.critic is not None:
                from safetensors.torch import save_file

                state = _unwrap(self.critic).state_dict()
                save_file(
                    {k: v.contiguous() for k, v in state.items()},
                    str(self.run_dir / "final" / "critic_head.safetensors"),
                )
        self.accelerator.wait_for_everyone()

    def latest_saved_epoch(self) -> int:
        done = ckpt.list_checkpoints(self.run_dir)
        return int(ckpt.read_manifest(done[-1])["epoch"]) if done else -1

    def _summary(self, m: dict[str, float]) -> str:
        parts = [
            f"epoch {int(m['epoch'])}/{self.config.train.epochs}",
            f"queries {int(m['reward_queries'])}",
            f"reward {m['reward_mean']:.4f}±{m['reward_std']:.4f}",
        ]
        parts += [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in m.items() if k.startswith("panel/")]
        for key in (
            "policy_loss",
            "critic_loss",
            "critic_ev",
            "approx_kl",
            "clipfrac",
            "dormant_fraction",
            "neurons_reset",
        ):
            if (
                key in m
                and m[key] is not None
                and not (isinstance(m[key], float) and math.isnan(m[key]))
            ):
                parts.append(f"{key} {m[key]:.4g}")
        parts.append(f"{m['seconds']:.1f}s")
        return " | ".join(parts)
