"""The demo world as an evaluation set: held-out scenes with their ground truth (`lmaczs eval --data demo`).

Scenes of the world's test split, each a clip with a ground-truth region per event kind it holds;
the classes are the 14 event kinds and their prompts `world.prompt_for`. The evaluation core
(`lmaczs_cli.evaluate`) names this function in its `NAMED_DATASETS` and imports it only when
asked for ``demo``.
"""
from __future__ import annotations

import functools

from ..evaluate import Dataset, EvalClip
from . import world

SCENES = 32   # scenes when no limit is given


def eval_dataset(limit: int | None = None, seed: int = 0) -> Dataset:
    """The first ``limit`` (default `SCENES`) test-split scenes of world seed ``seed``."""
    classes = list(world.EVENTS)
    clips = []
    for i in range(limit or SCENES):
        s = world.scene_seed(seed, "test", i)
        names = [e.name for e in scene(s).events]
        clips.append(EvalClip(f"test/scene_{i:05d}", tuple(classes.index(x) for x in names),
                              scene=functools.partial(scene, s)))
    return Dataset(classes, [world.prompt_for(c) for c in classes], clips, "demo")


@functools.lru_cache(maxsize=32)
def scene(seed: int) -> world.Scene:
    """A world scene, rendered once per batch rather than once per method and look-up."""
    return world.render_scene(seed)
