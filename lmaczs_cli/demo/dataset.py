"""The demo world as an evaluation set: held-out scenes with their ground truth.

``lmaczs eval --data demo`` reads the *selection* split (`scores.SPLITS`: the scenes every choice
of recipe, threshold and model is made on); ``--data demo-test`` the frozen *test* split, which only
the published report reads (``bench/eval.py --frozen``). Each scene is a clip with a ground-truth
region per event kind it holds; the classes are the 14 event kinds and their prompts
`world.prompt_for`. The evaluation core (`lmaczs_cli.evaluate`) names these functions in its
`NAMED_DATASETS` and imports them only when asked.
"""
from __future__ import annotations

import functools

from ..evaluate import Dataset, EvalClip
from . import scores, world

SCENES = 32   # scenes when no limit is given


def eval_dataset(limit: int | None = None, seed: int = 0) -> Dataset:
    """The first ``limit`` (default `SCENES`) scenes of world seed ``seed``'s "test" block: for
    seed 0, the selection split."""
    return _dataset([world.scene_seed(seed, "test", i) for i in range(limit or SCENES)], "test")


def frozen_test_dataset(limit: int | None = None, seed: int = 0) -> Dataset:
    """The first ``limit`` (default `SCENES`) scenes of the frozen test split. The scenes are fixed
    by the split: ``seed`` (the contamination noise's, the re-initialisation's) does not move them."""
    return _dataset(scores.split_seeds("test", limit or SCENES), "frozen")


def _dataset(seeds: list[int], prefix: str) -> Dataset:
    classes = list(world.EVENTS)
    clips = []
    for i, s in enumerate(seeds):
        names = [e.name for e in scene(s).events]
        clips.append(EvalClip(f"{prefix}/scene_{i:05d}", tuple(classes.index(x) for x in names),
                              scene=functools.partial(scene, s)))
    return Dataset(classes, [world.prompt_for(c) for c in classes], clips, "demo")


@functools.lru_cache(maxsize=32)
def scene(seed: int) -> world.Scene:
    """A world scene, rendered once per batch rather than once per method and look-up."""
    return world.render_scene(seed)
