"""Configuration: nested dataclasses, presets, YAML files, ``--set a.b=value`` overrides, validation.

Every field carries its help text (shown by ``tdpo train --help``). Values are checked here, in one
place, before any model loads: a bad one raises :class:`tdpo.errors.UsageError` naming the field,
the value and the fix. Presets are plain Python dicts of overrides (never executed code).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tdpo.checkpoint import config_hash
from tdpo.errors import UsageError
from tdpo.fileio import atomic_write
from tdpo.methods import ALGORITHMS, get_method
from tdpo.prompts import prompt_set_specs
from tdpo.rundir import CONFIG_FILE, check_run_name


def _f(default: Any, help: str) -> Any:
    """A dataclass field with help text (lists get a default factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    pretrained: str = _f(
        "shapes-world",
        "Stable Diffusion 1.x/2.x, SDXL or Stable Diffusion 3 pipeline: a Hub id or a folder saved "
        "with save_pretrained (shapes-world = the embedded shapes world; shapes-flow = its "
        "rectified-flow, SD3-style counterpart, docs/shapes_world.md).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the pipeline.")
    finetune: Literal["lora", "full"] = _f(
        "lora", "What of the UNet is trained: LoRA adapters (peft) or every weight."
    )
    lora_rank: int = _f(4, "LoRA rank r.")
    lora_alpha: float = _f(4.0, "LoRA alpha (scale = alpha / rank).")
    lora_targets: list[str] = _f(
        ["to_q", "to_k", "to_v", "to_out.0"], "UNet module names that receive LoRA adapters."
    )


@dataclass
class SampleConfig:
    num_steps: int = _f(20, "DDIM sampling steps T (the paper: 50).")
    eta: float = _f(1.0, "DDIM eta (> 0: each step is a Gaussian policy step).")
    noise_level: float = _f(
        0.7,
        "Flow-matching models (Stable Diffusion 3): the SDE noise level a, sigma_t = "
        "a * sqrt(t / (1 - t)) (Flow-GRPO's SDE and default 0.7; docs/algorithm.md); DDIM "
        "models use sample.eta instead.",
    )
    guidance_scale: float = _f(
        4.0, "Classifier-free guidance w (1.0 disables guidance; the paper: 5)."
    )
    batch_size: int = _f(32, "Images sampled per process per batch.")
    merge_lora: bool = _f(
        True,
        "LoRA runs: fold the adapters into a copy of the adapted weights (W + s B A) for the "
        "gradient-free sampling passes, one matmul per layer instead of three (about 10 % "
        "faster per pass on the shapes world, docs/performance.md); the log-probs differ from "
        "unmerged passes by float rounding. Not used while the KL reference is sampled.",
    )
    prompts_per_epoch: int | None = _f(
        None,
        "Distinct prompts drawn per epoch, each repeated samples_per_epoch / prompts_per_epoch "
        "times, so per-prompt and group normalization have a group from the first epoch (0 = "
        "draw every sample's prompt independently, as the paper). Unset (null) = groups of "
        "4: samples_per_epoch / 4 prompts (16 of the shapes default 64; 8 prompts per epoch "
        "before this version: more prompts per epoch let the critic generalize to the next "
        "epoch's, docs/results/mechanism.md), or 0 when samples_per_epoch is not a multiple "
        "of 4 or below 8. The resolved number is what config.yaml records.",
    )
    samples_per_epoch: int = _f(
        64, "Images sampled per epoch over all processes (reward queries per epoch)."
    )


@dataclass
class TrainConfig:
    algorithm: Literal[ALGORITHMS] = _f(
        "tdpo",
        "tdpo: per-timestep advantages from the temporal critic (TDPO-R with reset.enabled); "
        "ddpo: the final reward at every step; alignprop: backpropagate a differentiable reward "
        "through the last sampling steps (the registry: tdpo.methods).",
    )
    epochs: int = _f(16, "Epochs (sample, then update); the paper: 100.")
    batch_size: int = _f(16, "Training minibatch per process (samples per forward pass).")
    updates_per_epoch: int = _f(
        0,
        "Optimizer updates per inner epoch; 0 = auto: 2 per timestep slice (the paper's 100 at "
        "50 steps) for tdpo and ddpo, one per sampling batch for alignprop. tdpo needs a "
        "multiple of sample.num_steps.",
    )
    inner_epochs: int = _f(
        1, "Passes over each epoch's samples (the mechanism sweep uses 2: docs/results)."
    )
    alignprop_steps: int = _f(1, "AlignProp: sampling steps (the last K) that keep the graph.")
    gradient_checkpointing: bool = _f(
        True, "AlignProp: recompute UNet activations in the backward pass to save memory."
    )
    learning_rate: float = _f(
        1e-3,
        "Policy AdamW learning rate (the paper: 1e-4). 3e-3 with clip 5e-2 and 2 inner epochs "
        "moves the shapes world's held-out reward 6x faster but over-optimizes and can collapse "
        "within 16 epochs (docs/results/mechanism.md).",
    )
    adam_beta1: float = _f(0.9, "AdamW beta1 (policy and critic).")
    adam_beta2: float = _f(0.999, "AdamW beta2 (policy and critic).")
    weight_decay: float = _f(1e-4, "AdamW weight decay (policy and critic).")
    adam_eps: float = _f(1e-8, "AdamW epsilon (policy and critic).")
    max_grad_norm: float = _f(1.0, "Gradient-norm clip for the policy (and, separately, critic).")
    clip_range: float = _f(1e-2, "PPO ratio clip epsilon (the paper: 1e-4).")
    cfg: bool = _f(True, "Use classifier-free guidance when re-evaluating log-probs in training.")
    max_nonfinite_fraction: float = _f(
        0.1,
        "Samples with NaN/inf rewards are left out of the update; past this fraction of an "
        "epoch the run stops with an error (its last checkpoint intact).",
    )
    normalization: Literal["per_prompt", "group", "batch", "running"] = _f(
        "running",
        "Reward normalization R~: per_prompt = each prompt's last norm_buffer_size rewards once "
        "it has norm_min_count of them, else the batch's (the paper; its meaning drifts as the "
        "buffers fill); group = each prompt's samples of this epoch only (GRPO; needs "
        "sample.prompts_per_epoch with >= 2 samples per prompt); batch = the whole epoch's; "
        "running = every reward of the run so far (a fixed meaning: the critic learns the "
        "prompt's expected reward, and A = G - V carries the per-prompt baseline). The shapes "
        "default is running (the critic learns: docs/results/mechanism.md); the DDPO presets "
        "and the sd14 presets use per_prompt.",
    )
    norm_buffer_size: int = _f(32, "Per-prompt normalization: rewards kept per prompt.")
    norm_min_count: int = _f(
        16, "Per-prompt normalization: rewards needed before per-prompt stats."
    )


@dataclass
class CriticConfig:
    input: Literal["image", "x0", "latent"] = _f(
        "x0",
        "What the critic sees: image = embed(decode(x_t)) with the frozen backbone (the paper; "
        "T extra VAE decodes and backbone passes per sample); x0 = embed(decode(x0_hat)), the "
        "denoiser's own estimate of the final image at that step (same cost); latent = x_t "
        "average-pooled to 4x8x8 plus the timestep (no decode, no backbone: the cheap critic).",
    )
    prompt_input: bool = _f(
        True,
        "Also feed the prompt: the text encoder's hidden states averaged over tokens, "
        "L2-normalized (the paper's critic sees no prompt).",
    )
    backbone: str = _f(
        "shapes-clip",
        "Frozen image-embedding backbone of the temporal critic (CLIP vision tower id or path).",
    )
    head: Literal["linear", "relu"] = _f(
        "relu",
        "Critic head: linear = the reference MLP with no nonlinearity (the paper's; a linear map "
        "of its input), relu = the same widths with a ReLU after each hidden layer.",
    )
    timestep_input: bool = _f(False, "Feed the normalized timestep to the head as well.")
    init: Literal["reference", "fan_in"] = _f(
        "fan_in",
        "Head weights: reference = every layer N(0, (1/(d+1))^2) (d the input width; the output "
        "starts near 0 and a linear 5-layer head barely moves from there); fan_in = each layer "
        "N(0, 1/fan_in). Resets redraw from the same distribution.",
    )
    standardize: bool = _f(
        True,
        "Standardize the head's input with running per-feature mean and std (observation "
        "normalization; the reference head sees raw L2-normalized embeddings).",
    )
    learning_rate: float = _f(1e-3, "Critic AdamW learning rate (the paper: 1e-4).")
    value_clip: float = _f(0.2, "Clip range of the value loss around V_old.")
    replay_epochs: int = _f(
        4,
        "The critic trains on the states of the last this many epochs (this one included; "
        "1 = this epoch's only, the paper). Its minibatches are drawn from them, so the number "
        "of critic steps is unchanged; V_old for the advantages is always this epoch's. On the "
        "shapes world 4 lifts the critic's explained variance on the next epoch's new prompts "
        "from -0.3..0.4 to 0.2..0.8 (docs/results/mechanism.md).",
    )
    value_coef: float = _f(1.0, "Weight c_v of the value loss.")
    embed_batch_size: int = _f(64, "States decoded and embedded per batch when valuing states.")
    decoder: Literal["vae", "tiny"] = _f(
        "vae",
        "How an image or x0 critic decodes states: vae = the pipeline's VAE (the paper); tiny = "
        "the decoder of a tiny autoencoder (diffusers AutoencoderTiny, TAESD; critic.tiny_decoder), "
        "far cheaper than the VAE at SD scale. Rewards and log.critic_reference still see the "
        "VAE's images.",
    )
    tiny_decoder: str = _f(
        "madebyollin/taesd",
        "The AutoencoderTiny of critic.decoder=tiny: a folder or Hub id (madebyollin/taesd for "
        "SD 1.x/2.x latents, madebyollin/taesdxl for SDXL, madebyollin/taesd3 for SD3); its "
        "latent_channels must equal the pipeline VAE's.",
    )


@dataclass
class ResetConfig:
    enabled: bool = _f(True, "TDPO-R: periodically re-initialize critic neurons.")
    every: int = _f(
        8,
        "Reset period F in epochs (the paper: 10 of 100 epochs of 256 samples, 2,560 samples "
        "between resets; the shapes default: 8 of 16 epochs of 64 samples, 512 between resets, "
        "so the critic relearns before it is reset again). No reset after the last epoch.",
    )
    tau: float = _f(0.0, "Dormancy threshold: a neuron is dormant if its score s_i <= tau.")
    target: Literal["active", "dormant", "all"] = _f(
        "active", "Which neurons to re-initialize: active (TDPO-R), dormant (ReDo) or all."
    )
    outgoing: Literal["redraw", "zero"] = _f(
        "redraw", "Outgoing weights of reset neurons: redraw (reference code) or zero (ReDo)."
    )
    stats_batch_size: int = _f(256, "State embeddings used to score neurons each epoch.")


@dataclass
class KLConfig:
    coef: float = _f(
        0.0,
        "Per-step KL penalty beta against the frozen base model, subtracted from the returns "
        "(ddpo-pytorch's form; 0 = off).",
    )
    loss_coef: float = _f(
        0.0,
        "KL loss beta: beta * estimator(log pi_theta - log pi_ref) added to the loss of every "
        "trained step, the base model's log-prob recomputed there (GRPO's form; Flow-GRPO: "
        "0.04; 0 = off).",
    )
    estimator: Literal["kl", "abs", "square", "clip", "approx"] = _f(
        "kl", "KL estimator on d = log pi - log pi_ref (approx = Schulman's k3, GRPO's)."
    )
    adaptive: bool = _f(False, "Adapt beta towards kl.target (Ziegler et al. 2019).")
    target: float = _f(0.1, "Adaptive KL: target per-step KL.")
    horizon: int = _f(10000, "Adaptive KL: horizon in samples.")


@dataclass
class RewardConfig:
    name: str = _f(
        "shapes_aesthetic",
        "Training reward: a registered name or a user factory package.module:callable.",
    )
    panel: list[str] = _f(
        [
            "shapes_pickscore",
            "shapes_hps",
            "shapes_imagereward",
            "shapes_gold_alignment",
            "shapes_gold_aesthetic",
            "shapes_gold",
        ],
        "Evaluation rewards scored on every sample (cross-reward generalization).",
    )


@dataclass
class PromptConfig:
    train: str = _f("shapes", "Training prompts: a shipped set name or a .txt file (one per line).")


@dataclass
class EvalConfig:
    every: int = _f(
        4,
        "Evaluate on held-out prompts before training, every N epochs and after the last "
        "epoch (0 = never).",
    )
    prompt_sets: list[str] = _f(
        ["seen=shapes", "unseen=shapes_unseen"],
        "Held-out prompt sets, each `label=set_or_file` or a set name (label = the name); "
        "metrics are keyed eval/<label>/<reward>.",
    )
    prompts_per_set: int = _f(16, "Prompts per set, spread evenly over it (0 = all).")
    seeds_per_prompt: int = _f(2, "Samples per prompt; their initial noise is fixed across epochs.")
    rewards: list[str] = _f([], "Rewards scored in evaluation (default: training reward + panel).")
    batch_size: int = _f(16, "Evaluation sampling batch size.")
    monitor: str | None = _f(
        None,
        "Over-optimization monitor: an eval metric such as eval/unseen/shapes_gold; the best "
        "LoRA by it is kept in best/.",
    )
    patience: int = _f(
        0, "Stop after this many evaluations without improving the monitor (0 = off)."
    )


@dataclass
class LogConfig:
    tensorboard: bool = _f(True, "Write TensorBoard events into the run directory.")
    wandb: bool = _f(False, "Log to Weights & Biases (pip install tdpo[wandb]).")
    wandb_project: str = _f("tdpo", "W&B project name.")
    grid_every: int = _f(1, "Save a sample grid every N epochs (0 = never).")
    progress: bool = _f(True, "Progress bars on the main process when attached to a terminal.")
    dump_tensors: bool = _f(
        False, "Debug: save per-process rewards and advantages of each epoch under debug/."
    )
    critic_reference: bool = _f(
        True,
        "TDPO: also score the denoiser's x0 estimate of every step with the training reward and "
        "log critic_ref/q1..q4, how much of the critic's target it explains (an upper reference "
        "for critic_ev/q1..q4; T extra decodes and reward calls per sample).",
    )


@dataclass
class CheckpointConfig:
    every: int = _f(1, "Write a resumable checkpoint every N epochs (and on SIGINT/SIGTERM).")
    keep: int = _f(2, "Checkpoints kept (oldest deleted).")


@dataclass
class Config:
    output_dir: str = _f("runs", "Parent folder of run directories.")
    run_name: str | None = _f(
        None,
        "Run directory name (default: [<setup preset>-]<method>-<timestamp>, e.g. "
        "tdpo-r-20261202-040000).",
    )
    seed: int = _f(0, "Seed of every random draw (prompts, noise, shuffles, dropout, resets).")
    cpu_threads: int = _f(
        1,
        "torch CPU threads (0 = torch's default). 1 suits the tiny shapes world and stays fast "
        "when other jobs share the cores (2 threads on 2 busy cores measured ~9x slower).",
    )
    mixed_precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "Autocast precision for training; frozen models use it on GPU too."
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------------------------
# Presets: plain override dicts, applied on the defaults before the YAML file and --set.

ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    "tdpo": {"train.algorithm": "tdpo", "reset.enabled": False, "train.updates_per_epoch": 0},
    "tdpo-r": {
        "train.algorithm": "tdpo",
        "reset.enabled": True,
        "reset.target": "active",
        "train.updates_per_epoch": 0,
    },
    # DDPO normalizes per prompt, as ddpo-pytorch and the paper do.
    "ddpo-2": {
        "train.algorithm": "ddpo",
        "train.updates_per_epoch": 2,
        "reset.enabled": False,
        "train.normalization": "per_prompt",
    },
    # DDPO with as many updates per epoch as TDPO makes (2 per timestep slice: 100 at 50 steps).
    "ddpo-100": {
        "train.algorithm": "ddpo",
        "train.updates_per_epoch": 0,
        "reset.enabled": False,
        "train.normalization": "per_prompt",
    },
    # GRPO as Flow-GRPO configures it (config/grpo.py there): group-relative advantages, KL loss
    # beta 0.04 with the k3 estimator, updates accumulated over all timesteps, 2 per epoch.
    "grpo": {
        "train.algorithm": "grpo",
        "train.updates_per_epoch": 2,
        "train.normalization": "group",
        "kl.loss_coef": 0.04,
        "kl.estimator": "approx",
        "reset.enabled": False,
    },
    "alignprop": {
        "train.algorithm": "alignprop",
        "reset.enabled": False,
        "train.updates_per_epoch": 0,
    },
}

# The paper's three runs (algorithm.md, "Reference hyperparameters"), TDPO-R by default; combine
# with an algorithm preset for the baselines: --preset sd14-aesthetic --preset ddpo-2.
# The paper's critic and reward normalization (the shapes defaults differ where measured better).
PAPER_CRITIC = {
    "critic.input": "image",
    "critic.prompt_input": False,
    "critic.head": "linear",
    "critic.init": "reference",
    "critic.standardize": False,
    "critic.replay_epochs": 1,
    "train.normalization": "per_prompt",
    "log.critic_reference": False,
}
_SD14 = {
    **PAPER_CRITIC,
    "cpu_threads": 0,
    "model.pretrained": "CompVis/stable-diffusion-v1-4",
    "model.lora_rank": 4,
    "model.lora_alpha": 4.0,
    "mixed_precision": "bf16",
    "sample.num_steps": 50,
    "sample.eta": 1.0,
    "sample.guidance_scale": 5.0,
    "sample.batch_size": 8,
    "sample.samples_per_epoch": 256,
    "sample.prompts_per_epoch": 0,
    "train.epochs": 100,
    "train.batch_size": 1,
    "train.updates_per_epoch": 0,
    "train.learning_rate": 1e-4,
    "train.clip_range": 1e-4,
    "train.inner_epochs": 1,
    "train.norm_buffer_size": 32,
    "train.norm_min_count": 16,
    "critic.learning_rate": 1e-4,
    "critic.backbone": "openai/clip-vit-large-patch14",
    "critic.embed_batch_size": 32,
    "reset.enabled": True,
    "reset.every": 10,
    "reset.tau": 0.0,
    "train.algorithm": "tdpo",
    "prompts.train": "simple_animals",
    "eval.every": 10,
    "eval.prompt_sets": ["seen=simple_animals", "unseen=unseen_animals"],
    "eval.prompts_per_set": 16,
    "eval.seeds_per_prompt": 2,
    "eval.batch_size": 8,
    "checkpoint.every": 5,
}
SETUP_PRESETS: dict[str, dict[str, Any]] = {
    "sd14-aesthetic": {
        **_SD14,
        "reward.name": "aesthetic",
        "reward.panel": ["imagereward", "pickscore", "hpsv2"],
    },
    "sd14-pickscore": {
        **_SD14,
        "reward.name": "pickscore",
        "reward.panel": ["hpsv2", "imagereward", "aesthetic"],
        "critic.backbone": "pickscore",
    },
    "sd14-hpsv2": {
        **_SD14,
        "reward.name": "hpsv2",
        "reward.panel": ["pickscore", "imagereward", "aesthetic"],
        "critic.backbone": "hpsv2",
        "prompts.train": "hpsv2_photo",
        "eval.prompt_sets": ["seen=hpsv2_photo"],
    },
}
SETUP_PRESETS["shapes"] = {}  # the defaults: the embedded shapes world
PRESETS: dict[str, dict[str, Any]] = {**ALGORITHM_PRESETS, **SETUP_PRESETS}

# Keys a resumed run may change (everything else must match the run's config).
RESUME_MUTABLE_PREFIXES = ("train.epochs", "log.", "checkpoint.", "eval.")


# ----------------------------------------------------------------------------------------------
# Introspection helpers.


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted name, type, default, help) of every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, name + ".")
        else:
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            yield name, tp, default, f.metadata.get("help", "")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def fields_help() -> str:
    """All fields with type, default and help: the body of ``tdpo train --help``'s epilog."""
    lines = []
    section = None
    for name, tp, default, help_text in iter_fields():
        head = name.split(".")[0] if "." in name else ""
        if head != section:
            section = head
            lines.append(f"\n[{head or 'run'}]")
        lines.append(f"  {name} ({type_name(tp)}, default {default!r})")
        lines.append(f"      {help_text}")
    return "\n".join(lines)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int->float; raise UsageError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UsageError(name, value, f"choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except UsageError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UsageError(name, value, "expected a list, e.g. [a, b] or a,b")
        return [_coerce(f"{name}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(name, value, "expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(name, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise UsageError(name, value, "expected a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(name, value, "expected a number")
        if not math.isfinite(value):
            raise UsageError(name, value, "expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(name, value, "expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")


_LEAF_TYPES = {name: tp for name, tp, _, _ in iter_fields()}


# Keys of earlier versions that old run configs still hold: old key -> (new key, value map).
RENAMED_KEYS = {
    "train.per_prompt_normalization": (
        "train.normalization",
        lambda on: "per_prompt" if on else "batch",
    ),
}


# Keys added in this version, with the value that reproduces what runs written before them did.
ADDED_KEYS = {
    "train.normalization": "per_prompt",
    "critic.prompt_input": False,
    "critic.init": "reference",
    "critic.standardize": False,
    "log.critic_reference": False,
    "kl.loss_coef": 0.0,
    "critic.replay_epochs": 1,
    "sample.noise_level": 0.7,  # flow models only: runs before it were all DDIM
    "critic.decoder": "vae",
    "critic.tiny_decoder": "madebyollin/taesd",
    "sample.merge_lora": False,
}


def set_value(config: Config, dotted: str, value: Any, source: str = "") -> None:
    """Set one leaf field by dotted name, type-checked."""
    if dotted in RENAMED_KEYS:
        dotted, convert = RENAMED_KEYS[dotted]
        value = convert(value)
    if dotted not in _LEAF_TYPES:
        close = difflib.get_close_matches(dotted, list(_LEAF_TYPES), n=1)
        hint = f"did you mean {close[0]}?" if close else "see `tdpo train --help` for every field"
        raise UsageError(dotted, value, f"unknown config key{source}; {hint}")
    value = _coerce(dotted, value, _LEAF_TYPES[dotted])
    target = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


class _YamlRefused(yaml.YAMLError):
    """YAML that :class:`StrictLoader` refuses: an alias or a duplicate key."""

    def __init__(self, problem: str, mark: Any = None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases and without duplicate keys: a few lines of nested
    aliases expand to billions of values (the "billion laughs"), and a key given twice (a
    section written twice) would silently keep one of them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _YamlRefused(
                f"YAML aliases (*{event.anchor}) are not supported; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise _YamlRefused(
                        f"the key {key_node.value!r} is given twice; give each key once",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def strict_yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`StrictLoader` (yaml.YAMLError on bad or refused YAML)."""
    loader = StrictLoader(text)  # what yaml.load(text, Loader=StrictLoader) does
    try:
        return loader.get_single_data()
    except RecursionError:
        raise _YamlRefused("nested too deeply") from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", yaml-parsed value)."""
    if "=" not in text:
        raise UsageError("--set", text, "write overrides as key=value, e.g. --set train.epochs=10")
    key, raw = text.split("=", 1)
    try:
        value = strict_yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str | int | float | bool | list) or value is None:
        return key.strip(), value
    return key.strip(), raw


def read_text_file(path: Path, field_name: str) -> str:
    """A file's text as UTF-8; UsageError naming the field for an unreadable or non-UTF-8 one."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(
            field_name, str(path), f"cannot read the file ({error.strerror or error})"
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UsageError(
            field_name,
            str(path),
            f"not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); save it as UTF-8",
        ) from None


def load_yaml(path: str | Path, field_name: str = "--config") -> dict[str, Any]:
    """A YAML file that holds a mapping (:class:`StrictLoader`: no aliases, no duplicate keys);
    UsageError naming ``field_name`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(field_name, str(path), "no such file; give a YAML config file")
    text = read_text_file(path, field_name)
    try:
        data = strict_yaml_load(text) or {}
    except _YamlRefused as exc:
        line = getattr(exc.problem_mark, "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UsageError(field_name, str(path), f"{exc.problem}{where}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UsageError(field_name, str(path), f"not valid YAML{where}; fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(field_name, str(path), "the file must hold a mapping of config sections")
    return data


def build_config(
    preset: str | list[str] | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults <- preset <- base <- YAML file <- overrides, then validate.

    ``base`` is a saved run config (a run's config.yaml): keys it lacks were added after it was
    written, and take the value that reproduces the older behaviour (:data:`ADDED_KEYS`)."""
    config = Config()
    for name in [preset] if isinstance(preset, str) else preset or []:
        if name not in PRESETS:
            raise UsageError("--preset", name, f"choose one of {', '.join(PRESETS)}")
        for key, value in PRESETS[name].items():
            set_value(config, key, value)
    if base:
        saved = flatten(base)
        for key, value in ADDED_KEYS.items():
            if key not in saved and not any(RENAMED_KEYS.get(k, ("",))[0] == key for k in saved):
                set_value(config, key, value)
        for key, value in saved.items():
            set_value(config, key, value)
    if config_file is not None:
        for key, value in flatten(load_yaml(config_file)).items():
            set_value(config, key, value, source=f" in {config_file}")
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    validate(config)
    return config


PROMPT_GROUP = 4  # samples per prompt when sample.prompts_per_epoch is left unset


def resolve_defaults(config: Config) -> None:
    """Defaults that depend on other fields, resolved once so that config.yaml records them."""
    s = config.sample
    if s.prompts_per_epoch is None:
        groups = s.samples_per_epoch % PROMPT_GROUP == 0 and s.samples_per_epoch >= 2 * PROMPT_GROUP
        s.prompts_per_epoch = s.samples_per_epoch // PROMPT_GROUP if groups else 0


def _positive(name: str, value: float, fix: str = "must be > 0") -> None:
    if value <= 0:
        raise UsageError(name, value, fix)


def validate(config: Config) -> None:
    """Range checks that do not depend on the number of processes or on models (after
    :func:`resolve_defaults`, which it calls first)."""
    resolve_defaults(config)
    s, t, c, r, k = config.sample, config.train, config.critic, config.reset, config.kl
    check_run_name(config.run_name)
    _positive("sample.num_steps", s.num_steps, "must be >= 1 (the paper uses 50)")
    _positive("sample.eta", s.eta, "must be > 0: with eta = 0 DDIM is deterministic, no policy")
    _positive("sample.batch_size", s.batch_size, "must be >= 1")
    _positive("sample.samples_per_epoch", s.samples_per_epoch, "must be >= 1")
    if s.eta > 1:
        raise UsageError("sample.eta", s.eta, "must be in (0, 1] (1 = the DDPM variance)")
    if not 0 < s.noise_level <= 1:
        raise UsageError(
            "sample.noise_level",
            s.noise_level,
            "must be in (0, 1] (Flow-GRPO uses 0.7; 0 is the deterministic ODE, no policy)",
        )
    if s.prompts_per_epoch < 0:
        raise UsageError(
            "sample.prompts_per_epoch", s.prompts_per_epoch, "must be >= 0 (0 = independent draws)"
        )
    if not 1.0 <= s.guidance_scale <= MAX_GUIDANCE:
        raise UsageError(
            "sample.guidance_scale",
            s.guidance_scale,
            f"must be in [1, {MAX_GUIDANCE:g}] (1 = no CFG; Stable Diffusion uses 5 to 7.5)",
        )
    _positive("train.epochs", t.epochs, "must be >= 1")
    _positive("train.batch_size", t.batch_size, "must be >= 1")
    _positive("train.inner_epochs", t.inner_epochs, "must be >= 1")
    if t.updates_per_epoch < 0:
        raise UsageError("train.updates_per_epoch", t.updates_per_epoch, "must be >= 0 (0 = auto)")
    for name in ("learning_rate", "adam_eps", "max_grad_norm", "clip_range"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise UsageError(f"train.{name}", getattr(t, name), "must be in [0, 1)")
    if t.weight_decay < 0:
        raise UsageError("train.weight_decay", t.weight_decay, "must be >= 0")
    _positive("train.norm_buffer_size", t.norm_buffer_size, "must be >= 1")
    if not 1 <= t.norm_min_count <= t.norm_buffer_size:
        raise UsageError(
            "train.norm_min_count",
            t.norm_min_count,
            f"must be in [1, train.norm_buffer_size={t.norm_buffer_size}]",
        )
    if t.normalization == "group":
        group = s.samples_per_epoch // s.prompts_per_epoch if s.prompts_per_epoch else 1
        if group < 2:
            raise UsageError(
                "train.normalization",
                "group",
                "needs groups of >= 2 samples per prompt: set sample.prompts_per_epoch to at "
                f"most half of sample.samples_per_epoch={s.samples_per_epoch}",
            )
    _positive("critic.learning_rate", c.learning_rate)
    _positive("critic.value_clip", c.value_clip)
    if c.value_coef < 0:
        raise UsageError("critic.value_coef", c.value_coef, "must be >= 0")
    _positive("critic.embed_batch_size", c.embed_batch_size, "must be >= 1")
    _positive(
        "critic.replay_epochs", c.replay_epochs, "must be >= 1 (1 = this epoch's states only)"
    )
    if c.decoder == "tiny" and c.input == "latent":
        raise UsageError(
            "critic.decoder",
            "tiny",
            "the latent critic decodes nothing: set critic.input=image or x0, or critic.decoder=vae",
        )
    _positive("reset.every", r.every, "must be >= 1 epoch")
    if r.tau < 0:
        raise UsageError("reset.tau", r.tau, "must be >= 0")
    _positive("reset.stats_batch_size", r.stats_batch_size, "must be >= 1")
    if k.coef < 0:
        raise UsageError("kl.coef", k.coef, "must be >= 0 (0 = no KL penalty)")
    if k.loss_coef < 0:
        raise UsageError("kl.loss_coef", k.loss_coef, "must be >= 0 (0 = no KL loss)")
    if k.adaptive and k.coef == 0:
        raise UsageError("kl.coef", k.coef, "adaptive KL needs a starting kl.coef > 0")
    _positive("kl.target", k.target)
    _positive("kl.horizon", k.horizon)
    _positive("model.lora_rank", config.model.lora_rank, "must be >= 1")
    _positive("model.lora_alpha", config.model.lora_alpha)
    if config.model.finetune == "lora" and not config.model.lora_targets:
        raise UsageError("model.lora_targets", [], "name at least one UNet module, e.g. to_q")
    _positive("checkpoint.every", config.checkpoint.every, "must be >= 1 epoch")
    _positive("checkpoint.keep", config.checkpoint.keep, "must be >= 1")
    if config.log.grid_every < 0:
        raise UsageError("log.grid_every", config.log.grid_every, "must be >= 0 (0 = never)")
    if not config.reward.name:
        raise UsageError("reward.name", "", "name a reward, e.g. jpeg_compressibility")
    if not 0 <= t.max_nonfinite_fraction <= 1:
        raise UsageError(
            "train.max_nonfinite_fraction", t.max_nonfinite_fraction, "must be in [0, 1]"
        )
    if not 0 <= config.cpu_threads <= MAX_CPU_THREADS:
        raise UsageError(
            "cpu_threads",
            config.cpu_threads,
            f"must be in [0, {MAX_CPU_THREADS}] (0 = torch's default)",
        )
    e = config.eval
    if e.every < 0:
        raise UsageError("eval.every", e.every, "must be >= 0 (0 = never)")
    if e.every and not e.prompt_sets:
        raise UsageError(
            "eval.prompt_sets", [], "name at least one held-out prompt set to evaluate"
        )
    for name in ("seeds_per_prompt", "batch_size"):
        _positive(f"eval.{name}", getattr(e, name), "must be >= 1")
    if e.prompts_per_set < 0:
        raise UsageError("eval.prompts_per_set", e.prompts_per_set, "must be >= 0 (0 = all)")
    if e.monitor is not None and not e.monitor.startswith("eval/"):
        raise UsageError(
            "eval.monitor", e.monitor, "name an eval metric, e.g. eval/unseen/shapes_gold"
        )
    _check_eval_names(config)
    if e.patience < 0:
        raise UsageError("eval.patience", e.patience, "must be >= 0 (0 = off)")


MAX_GUIDANCE = 100.0  # larger scales saturate every pixel (and overflow float16/float32 CFG)
MAX_CPU_THREADS = 1024


def _check_eval_names(config: Config) -> None:
    """Distinct evaluation labels, and an ``eval.monitor`` that names a metric the evaluation
    will log: eval/<label>/<eval reward, kl or diversity>. Strings only, before anything loads."""
    e = config.eval
    labels: list[str] = []
    for i, (label, _) in enumerate(prompt_set_specs(e.prompt_sets)):
        if not label:
            raise UsageError(f"eval.prompt_sets[{i}]", e.prompt_sets[i], "give label=set_or_file")
        if label in labels:
            raise UsageError(
                f"eval.prompt_sets[{i}]",
                e.prompt_sets[i],
                f"the label {label!r} is used twice; give each set its own label=",
            )
        labels.append(label)
    if e.monitor is None:
        return
    if not e.every:
        raise UsageError(
            "eval.monitor", e.monitor, "needs the held-out evaluation: set eval.every >= 1"
        )
    rewards = e.rewards or [config.reward.name, *config.reward.panel]
    metrics = [f"eval/{label}/{name}" for label in labels for name in (*rewards, "kl", "diversity")]
    if e.monitor not in metrics:
        close = difflib.get_close_matches(e.monitor, metrics, n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(metrics)}"
        raise UsageError("eval.monitor", e.monitor, f"not a metric the evaluation logs; {hint}")


@dataclass(frozen=True)
class Schedule:
    """Per-process sizes derived from the global config and the process count."""

    num_processes: int
    samples_per_process: int
    sample_batches: int  # sampling batches per process per epoch
    minibatches: int  # training minibatches per process (per timestep slice for tdpo)
    updates_per_epoch: int  # optimizer updates per inner epoch
    accumulation: int  # minibatch passes (backward calls) per optimizer update
    inner_epochs: int = 1  # passes over each epoch's samples


def resolve_schedule(config: Config, num_processes: int) -> Schedule:
    """Keep samples and updates per epoch fixed whatever the process count; check divisibility.
    The algorithm (tdpo.methods) decides how many updates an epoch makes."""
    s, t = config.sample, config.train
    if s.samples_per_epoch % num_processes:
        raise UsageError(
            "sample.samples_per_epoch",
            s.samples_per_epoch,
            f"must be divisible by the number of processes ({num_processes})",
        )
    per_process = s.samples_per_epoch // num_processes
    if per_process % s.batch_size:
        raise UsageError(
            "sample.batch_size",
            s.batch_size,
            f"must divide the samples per process ({per_process} = "
            f"sample.samples_per_epoch / {num_processes} processes)",
        )
    if per_process % t.batch_size:
        raise UsageError(
            "train.batch_size", t.batch_size, f"must divide the samples per process ({per_process})"
        )
    minibatches = per_process // t.batch_size
    if s.prompts_per_epoch and s.samples_per_epoch % s.prompts_per_epoch:
        raise UsageError(
            "sample.prompts_per_epoch",
            s.prompts_per_epoch,
            f"must divide sample.samples_per_epoch={s.samples_per_epoch} (or be 0)",
        )
    method = get_method(t.algorithm)
    updates, accumulation, inner_epochs = method.plan_updates(config, per_process, minibatches)
    return Schedule(
        num_processes,
        per_process,
        per_process // s.batch_size,
        minibatches,
        updates,
        accumulation,
        inner_epochs,
    )


def method_label(config: Config) -> str:
    """The run's method as reports name it: TDPO-R, TDPO, DDPO-2, AlignProp, ..."""
    return get_method(config.train.algorithm).label(config)


def run_hash(config: Config, keys: set[str] | None = None) -> str:
    """The hash a run's checkpoints carry: the config minus what a resume may change.

    ``keys``: hash only these dotted keys, those of the run's own config.yaml
    (:func:`saved_keys`). A run written by an earlier version lacks the keys added since; its
    checkpoints hashed the keys it had, and the added ones hold their old behaviour
    (:data:`ADDED_KEYS`, not changeable on resume), so leaving them out keeps it resumable."""
    return config_hash(
        {
            key: value
            for key, value in flatten(to_dict(config)).items()
            if not key.startswith(RESUME_MUTABLE_PREFIXES) and (keys is None or key in keys)
        }
    )


def saved_keys(run_dir: str | Path) -> set[str] | None:
    """The dotted keys of ``run_dir/config.yaml`` (None before it is written)."""
    path = Path(run_dir) / CONFIG_FILE
    return set(flatten(load_yaml(path, "RUN_DIR"))) if path.is_file() else None


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def write_run_config(config: Config, run_dir: Path) -> None:
    """``run_dir/config.yaml``, written atomically (what ``tdpo train --resume`` reads)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / CONFIG_FILE, lambda f: f.write(config_to_yaml(config)))
