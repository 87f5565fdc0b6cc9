"""Registers the shapes world's prompt sets with :mod:`tdpo.prompts`:

- ``shapes``: the 102 seen prompts (the training set of pre-training and fine-tuning);
- ``shapes_unseen``: the 18 held-out prompts (attribute combinations never pre-trained on).

``tdpo.prompts`` imports this module lazily; importing :mod:`tdpo.world` also does.
"""

from __future__ import annotations

from tdpo.world.generator import all_prompts, seen_prompts, unseen_prompts

PROMPT_SETS = {"shapes": seen_prompts, "shapes_unseen": unseen_prompts, "shapes_all": all_prompts}

try:
    from tdpo.prompts import register_prompt_set
except ImportError:  # the prompts module is optional for the world itself
    register_prompt_set = None

if register_prompt_set is not None:
    for _name, _loader in PROMPT_SETS.items():
        register_prompt_set(_name, _loader)
