"""The shapes world as a plug-in (:mod:`tdpo.plugins`): registers its prompt sets and rewards.

Prompt sets: ``shapes`` (the 102 seen prompts, the training set of pre-training and
fine-tuning), ``shapes_unseen`` (the 18 held-out prompts, attribute combinations never
pre-trained on) and ``shapes_all``.

Rewards: the gold metrics :data:`tdpo.world.GOLD_REWARDS` and the learned rewards
:data:`tdpo.world.LEARNED_REWARDS` (see :mod:`tdpo.world.rewards`).

Importing this module imports neither torch nor a model; the reward factories do, when called.
"""

from __future__ import annotations

from tdpo.prompts import register_prompt_set
from tdpo.rewards import register_reward
from tdpo.world import GOLD_REWARDS, LEARNED_REWARDS
from tdpo.world.generator import all_prompts, seen_prompts, unseen_prompts

PROMPT_SETS = {"shapes": seen_prompts, "shapes_unseen": unseen_prompts, "shapes_all": all_prompts}


def _reward_factory(name: str):
    def factory(device="cpu"):
        # deferred: torch, the heads and the tiny CLIP load only when a world reward is built,
        # not when prompt sets or reward names are listed
        from tdpo.world.rewards import build_world_reward

        return build_world_reward(name, device)

    factory.__name__ = f"{name}_factory"
    factory.__doc__ = f"The shapes world's reward {name} (tdpo.world.rewards)."
    return factory


for _name, _loader in PROMPT_SETS.items():
    register_prompt_set(_name, _loader)

for _name in (*GOLD_REWARDS, *LEARNED_REWARDS):
    register_reward(_name)(_reward_factory(_name))
