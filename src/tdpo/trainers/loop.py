"""The training lifecycle, shared by every algorithm: a thin owner of state.

:class:`Trainer` owns the Accelerator, the policy, the rewards, the optimizer, the RNG, the
checkpoints, signals, the evaluation schedule and logging. What one epoch computes belongs to the
algorithm, a :class:`tdpo.methods.base.Method` chosen by ``train.algorithm`` through the registry
in :mod:`tdpo.methods`; the pure math lives in :mod:`tdpo.algos`.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from tdpo import checkpoint as ckpt
from tdpo.config import (
    Config,
    method_label,
    resolve_schedule,
    run_hash,
    saved_keys,
    to_dict,
    write_run_config,
)
from tdpo.errors import StorageError, UsageError, is_disk_full
from tdpo.evaluation import evaluate_policy, parse_prompt_sets
from tdpo.images import save_grid
from tdpo.methods import get_method
from tdpo.policy import DiffusionPolicy, unwrap
from tdpo.prompts import PromptSampler, load_prompts
from tdpo.results import describe_saved
from tdpo.rewards import build_reward
from tdpo.rundir import BEST_DIR, FINAL_DIR, SAMPLES_DIR
from tdpo.sampling import derive_seed, score_images
from tdpo.tracking import RunLogger, read_metrics, truncate_metrics
from tdpo.verdict import eval_lines, gold_or_first, judge, num, result_lines

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class Interrupted(Exception):
    """Raised inside the loop after SIGINT/SIGTERM, once state is safe to checkpoint."""

    def __init__(self, signum: int):
        self.signum = signum


class Trainer:
    """Fine-tunes a diffusion policy with the algorithm ``config.train.algorithm`` under
    Accelerate. ``train()`` runs the remaining epochs; ``epoch_step(epoch)`` runs one."""

    def __init__(self, config: Config, run_dir: Path, resume: bool = False, log=print):
        self.config = config
        self.run_dir = Path(run_dir)
        self.log = log
        # A fresh AcceleratorState per trainer, so several runs can share a process (sweeps,
        # notebooks) with different mixed precision; the process group (PartialState) stays.
        AcceleratorState._reset_state()
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        # cpu=True without CUDA: several processes then form a gloo (MULTI_CPU) group.
        self.accelerator = acc = Accelerator(
            mixed_precision=MIXED_PRECISION[config.mixed_precision],
            cpu=not torch.cuda.is_available(),
        )
        self.is_main = acc.is_main_process
        self.device = acc.device
        self.schedule = resolve_schedule(config, acc.num_processes)
        self.prompts = load_prompts(config.prompts.train)
        self.eval_sets = (
            parse_prompt_sets(config.eval.prompt_sets, config.eval.prompts_per_set)
            if config.eval.every
            else {}
        )
        # -- models (LoRA and critic initialization drawn from the run's seed) ----------------
        torch.manual_seed(derive_seed(config.seed, 0))
        self.weight_dtype = torch.float32
        if self.device.type == "cuda" and config.mixed_precision != "fp32":
            self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[
                config.mixed_precision
            ]
        self.policy = DiffusionPolicy.from_config(config.model, config.sample, self.weight_dtype)
        self.policy.to(self.device)
        if config.kl.coef > 0 or config.kl.loss_coef > 0:
            self.policy.enable_kl_reference()
        self.reward_fn = build_reward(config.reward.name, self.device)
        self.panel = {
            name: build_reward(name, self.device, field=f"reward.panel[{i}]")
            for i, name in enumerate(config.reward.panel)
        }
        self.eval_rewards = self._eval_rewards()
        self.method = get_method(config.train.algorithm)(self)
        t = config.train
        params = [{"params": self.policy.trainable_parameters(), "lr": t.learning_rate}]
        self.optimizer = torch.optim.AdamW(
            params + self.method.param_groups(),
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            eps=t.adam_eps,
        )
        self.unet, self.optimizer = acc.prepare(self.policy.unet, self.optimizer)
        self.method.prepare(acc)
        # -- state ----------------------------------------------------------------------------
        self.prompt_sampler = PromptSampler(self.prompts, derive_seed(config.seed, 1))
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.reward_queries = 0
        self.config_hash = run_hash(config, saved_keys(run_dir))
        self.best_monitor: float | None = None
        self.evals_since_best = 0
        # The base model's evaluation (the metrics row of epoch 0) was logged: a run resumed
        # from a checkpoint of epoch 0 (a signal during its first epoch) must not log it again.
        self.base_evaluated = False
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

    def _eval_rewards(self) -> dict[str, Any]:
        """Evaluation rewards: ``eval.rewards`` if given, else the training reward + the panel
        (models already built are reused)."""
        cfg = self.config
        built = {cfg.reward.name: self.reward_fn, **self.panel}
        if not cfg.eval.rewards:
            return built
        return {
            name: built.get(name) or build_reward(name, self.device, field=f"eval.rewards[{i}]")
            for i, name in enumerate(cfg.eval.rewards)
        }

    # ---------------------------------------------------------------------------------------
    # What algorithms use (tdpo.methods): the epoch's prompts, scoring, gathering, progress.

    @property
    def first_sample(self) -> int:
        """Index of this process's first sample in the epoch's global sample list."""
        return self.accelerator.process_index * self.schedule.samples_per_process

    def draw_prompts(self) -> list[str]:
        """The epoch's global prompt list: independent draws, or k prompts each repeated."""
        s = self.config.sample
        if not s.prompts_per_epoch:
            return self.prompt_sampler.sample(s.samples_per_epoch)
        repeats = s.samples_per_epoch // s.prompts_per_epoch
        return [p for p in self.prompt_sampler.sample(s.prompts_per_epoch) for _ in range(repeats)]

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        """Training reward per local image (on the device), and the panel's global means."""
        name = self.config.reward.name
        rewards = score_images({name: self.reward_fn}, images, prompts)[name]
        return rewards.to(self.device), self.score_panel(images, prompts)

    def reward_fields(self, names) -> dict[str, str]:
        """The config field of each reward name, for error messages (reward.panel[1], ...)."""
        cfg = self.config
        fields = {f"{cfg.reward.name}": "reward.name"}
        fields.update({n: f"reward.panel[{i}]" for i, n in enumerate(cfg.reward.panel)})
        fields.update({n: f"eval.rewards[{i}]" for i, n in enumerate(cfg.eval.rewards)})
        return {n: fields.get(n, "reward.name") for n in names}

    def score_panel(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """``panel/<reward>``: each evaluation-panel reward's mean over all processes' images."""
        scores = score_images(self.panel, images, prompts, self.reward_fields(self.panel))
        return {
            f"panel/{name}": float(self.gather(values.to(self.device)).double().mean())
            for name, values in scores.items()
        }

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.contiguous())

    def progress(self, total: int, desc: str):
        enabled = self.is_main and self.config.log.progress and sys.stderr.isatty()
        return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)

    def check_signal(self) -> None:
        """Stop at this safe point if SIGINT/SIGTERM arrived."""
        if self._signal is not None:
            raise Interrupted(self._signal)

    def save_grid(
        self, epoch: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor
    ) -> None:
        """samples/epoch_NNNN.png every ``log.grid_every`` epochs (main process)."""
        every = self.config.log.grid_every
        if not (self.is_main and every and epoch % every == 0):
            return
        count = min(16, len(prompts))
        captions = [
            f"{p}\n{self.config.reward.name} = {r:.3f}"
            for p, r in zip(prompts[:count], rewards[:count].tolist())
        ]
        path = self.run_dir / SAMPLES_DIR / f"epoch_{epoch:04d}.png"
        save_grid(images[:count].cpu(), captions, path)
        self.logger.log_image("samples", path, epoch)

    # ---------------------------------------------------------------------------------------
    # One epoch

    def epoch_step(self, epoch: int) -> dict[str, float]:
        """Run epoch ``epoch`` (0-based) of the algorithm; returns its metrics line."""
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, 3, epoch, acc.process_index))  # dropout
        metrics = self.method.run_epoch(epoch)
        self.global_step += self.schedule.updates_per_epoch * self.schedule.inner_epochs
        self.reward_queries += cfg.sample.samples_per_epoch
        return {
            "epoch": epoch + 1,
            "reward_queries": self.reward_queries,
            **metrics,
            "seconds": time.perf_counter() - start,
        }

    # ---------------------------------------------------------------------------------------
    # State and checkpoints

    def state_dict(self) -> dict[str, Any]:
        unet = unwrap(self.unet)
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "reward_queries": self.reward_queries,
            "num_processes": self.accelerator.num_processes,
            "policy": {
                n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad
            },
            "optimizer": self.optimizer.state_dict(),
            "prompt_sampler": self.prompt_sampler.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "best_monitor": self.best_monitor,
            "evals_since_best": self.evals_since_best,
            "base_evaluated": self.base_evaluated,
            **self.method.state_dict(),
        }
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        named = dict(unwrap(self.unet).named_parameters())
        with torch.no_grad():
            for name, value in state["policy"].items():
                named[name].copy_(value.to(named[name].device))
        self.method.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        ckpt.restore_rng_state(state["rng"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.reward_queries = int(state["reward_queries"])
        self.best_monitor = state.get("best_monitor")
        self.evals_since_best = int(state.get("evals_since_best", 0))
        # Checkpoints from before the flag: an epoch-0 checkpoint is written only after the
        # base evaluation (when it is on), so its row is in metrics.jsonl already.
        self.base_evaluated = bool(state.get("base_evaluated", True))

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
        if not isinstance(state, dict):
            state = {}
        required = ("epoch", "global_step", "reward_queries", "policy", "optimizer", "rng")
        missing = [key for key in (*required, "prompt_sampler") if key not in state]
        if missing:
            raise UsageError(
                "--resume",
                str(self.run_dir),
                f"checkpoint {path.name} does not hold a training state of this run (missing "
                f"{', '.join(missing[:5])}); delete it to resume from an older one, or start "
                "a new run",
            )
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
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise UsageError(
                "--resume",
                str(self.run_dir),
                f"checkpoint {path.name} does not fit this run ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); delete it to resume from "
                "an older one, or start a new run",
            ) from None
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

    def latest_saved_epoch(self) -> int:
        done = ckpt.list_checkpoints(self.run_dir)
        return int(ckpt.read_manifest(done[-1])["epoch"]) if done else -1

    def save_final(self) -> None:
        """final/: the LoRA in diffusers format (or the UNet) and the method's own artefacts."""
        if self.is_main:
            self.policy.save_final(self.run_dir / FINAL_DIR)
            self.method.save_final(self.run_dir / FINAL_DIR)
        self.accelerator.wait_for_everyone()

    def write_config(self) -> None:
        if self.is_main:
            write_run_config(self.config, self.run_dir)

    # ---------------------------------------------------------------------------------------
    # Signals: stop at the next safe point, checkpoint the last completed epoch, exit.

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._signal = signum
        if signum == signal.SIGINT:  # a second Ctrl-C exits at once (checkpoints are atomic)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    # ---------------------------------------------------------------------------------------
    # Evaluation and the loop

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation on the main process; updates the over-optimization monitor."""
        cfg = self.config.eval
        metrics: dict[str, float] = {}
        if self.is_main:
            with_kl = self.config.model.finetune == "lora" or self.policy.reference_unet is not None
            metrics, grids = evaluate_policy(
                self.policy,
                unwrap(self.unet),
                self.eval_sets,
                self.eval_rewards,
                cfg.seeds_per_prompt,
                self.config.seed,
                cfg.batch_size,
                embedder=getattr(self.method, "embedder", None),
                with_kl=with_kl,
                fields=self.reward_fields(self.eval_rewards),
            )
            for label, (images, captions) in grids.items():
                path = self.run_dir / SAMPLES_DIR / f"eval_{label}_epoch_{self.epoch:04d}.png"
                # 4 columns: two grids (before / after) fit side by side at full size in the report
                save_grid(images[:32], captions[:32], path, columns=4)
                self.logger.log_image(f"eval/{label}", path, self.epoch)
            if cfg.monitor is not None:
                self._update_monitor(metrics)
        shared = [self.best_monitor, self.evals_since_best]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(shared)
        self.best_monitor, self.evals_since_best = shared
        self.accelerator.wait_for_everyone()
        return metrics

    def _update_monitor(self, metrics: dict[str, float]) -> None:
        """Keep the best LoRA by ``eval.monitor`` in best/ (the over-optimization monitor)."""
        monitor = self.config.eval.monitor
        if monitor not in metrics:
            raise UsageError(
                "eval.monitor",
                monitor,
                f"not an eval metric of this run; choose one of {', '.join(sorted(metrics))}",
            )
        value = metrics[monitor]
        if self.best_monitor is None or value > self.best_monitor:
            self.best_monitor, self.evals_since_best = value, 0
            self.policy.save_final(self.run_dir / BEST_DIR)
            (self.run_dir / BEST_DIR / "epoch.txt").write_text(f"{self.epoch} {value}\n")
        else:
            self.evals_since_best += 1

    def _evaluates_after(self, epoch: int) -> bool:
        """The held-out evaluation runs after every ``eval.every``-th epoch and after the last
        one (so a run, also one resumed to more epochs, always ends evaluated)."""
        every = self.config.eval.every
        return bool(every) and (epoch % every == 0 or epoch == self.config.train.epochs)

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
            if cfg.eval.every and self.epoch == 0 and not self.base_evaluated:
                # The base model, as a reference point (once: not again on a resume).
                if self.is_main:
                    self.log(self._eval_announcement())
                base = self.evaluate()
                self.logger.log({"epoch": 0, "reward_queries": 0, **base}, step=0)
                self.base_evaluated = True
                self._log_eval(base)
            if self.is_main and self.epoch < cfg.train.epochs:
                self.log(
                    f"training {method_label(cfg)}: epochs {self.epoch + 1}-{cfg.train.epochs}, "
                    f"{cfg.sample.samples_per_epoch} samples each"
                )
            while self.epoch < cfg.train.epochs and not self._should_stop_early():
                # A consistent state to checkpoint if a signal arrives mid-epoch.
                saved = self.latest_saved_epoch() == self.epoch
                self._snapshot = None if saved else self.state_dict()
                self._mid_epoch = True
                metrics = self.epoch_step(self.epoch)
                self.epoch += 1
                self._mid_epoch = False
                if self.is_main:
                    self.log(self._summary(metrics))
                if self._evaluates_after(self.epoch):
                    held_out = self.evaluate()
                    metrics.update(held_out)
                    self._log_eval(held_out)
                self.logger.log(metrics, step=self.epoch)
                if self.epoch % cfg.checkpoint.every == 0 or self.epoch == cfg.train.epochs:
                    self.save()
                self.check_signal()
            if self._should_stop_early() and self.is_main:
                self.log(
                    f"early stop: {cfg.eval.monitor} did not improve for "
                    f"{cfg.eval.patience} evaluations (best {self.best_monitor:.4f}, "
                    f"{describe_saved(self.run_dir / BEST_DIR)})"
                )
                self.save()
            self.save_final()
            self._log_result()
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
        except Exception as error:
            if isinstance(error, StorageError) or not is_disk_full(error):
                raise
            raise StorageError(
                f"no space left on the device writing {self.run_dir} "
                f"({str(error).splitlines()[0][:160]}); free some space and resume with: "
                f"tdpo train --resume {self.run_dir} (the last checkpoint is intact)"
            ) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()

    # ---------------------------------------------------------------------------------------
    # The terminal: a short line per epoch, the held-out figures at each evaluation, the verdict
    # at the end (tdpo.verdict, the same function as the report). metrics.jsonl holds the rest.

    def _summary(self, m: dict[str, Any]) -> str:
        """The epoch line: epoch n/N, reward queries, training reward, gold (or the first panel
        reward) on the epoch's samples, the critic's explained variance, neurons reset,
        non-finite rewards when any, seconds."""
        parts = [
            f"epoch {int(m['epoch'])}/{self.config.train.epochs}",
            f"queries {int(m['reward_queries'])}",
            f"reward {num(_number(m.get('reward_mean')))}±{num(_number(m.get('reward_std')))}",
        ]
        reward = self.config.reward.name
        panel = [k.split("/", 1)[1] for k in m if k.startswith("panel/") and k != f"panel/{reward}"]
        shown = gold_or_first(panel)
        if shown is not None and _number(m.get(f"panel/{shown}")) is not None:
            parts.append(f"{shown} {num(m[f'panel/{shown}'])}")
        if _number(m.get("critic_ev")) is not None:
            parts.append(f"critic EV {m['critic_ev']:.2f}")
        if m.get("neurons_reset"):
            parts.append(f"reset {int(m['neurons_reset'])} neurons")
        if m.get("nonfinite_rewards"):
            parts.append(f"non-finite rewards {int(m['nonfinite_rewards'])}")
        parts.append(f"{m['seconds']:.1f}s")
        return " | ".join(parts)

    def _eval_announcement(self) -> str:
        seeds = self.config.eval.seeds_per_prompt
        sets = ", ".join(
            f"{label} {len(prompts)} prompts x {seeds} seed{'s' if seeds != 1 else ''}"
            for label, prompts in self.eval_sets.items()
        )
        return f"evaluating the base model (epoch 0) on held-out prompts: {sets}"

    def _base_row(self) -> dict[str, Any] | None:
        """The epoch-0 evaluation (this run's metrics.jsonl, so also after a resume)."""
        try:
            rows = read_metrics(self.run_dir)
        except (OSError, ValueError):
            return None
        return next((r for r in rows if r.get("epoch") == 0), None)

    def _log_eval(self, metrics: dict[str, Any]) -> None:
        """One line per held-out prompt set: training reward and gold, and their change."""
        if not self.is_main:
            return
        base = None if self.epoch == 0 else self._base_row()
        reward, epochs = self.config.reward.name, self.config.train.epochs
        for line in eval_lines(metrics, base, reward, self.epoch, epochs):
            self.log(line)

    def _log_result(self) -> None:
        """The closing summary: base -> final held-out figures and the verdict."""
        if not self.is_main:
            return
        try:
            rows = read_metrics(self.run_dir)
        except (OSError, ValueError):
            return
        for line in result_lines(judge([rows], self.config.reward.name)):
            self.log(line)
        self.log(f"plots and samples: tdpo report {self.run_dir}")


def _number(value: Any) -> float | None:
    """A finite number, or None (metrics lines hold None or NaN for missing values)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
