"""How right a demo model's explanations are, on held-out scenes of the demo world where the
truth is known: whether masks lie on the prompted event and stay small for absent prompts
(`localization_report`; the demo tests hold the bundled model to bounds on it), the similarity gap the
ground truth itself would leave under a CLAP (`oracle_report`), and whether the masks depend on
what CLAP saw (`randomization_report`); `by_event` and `oracle_by_event` split the first two per
event kind. The build records all of them in build.json.

Effective resolution: one HTSAT stage-1 token is 8 stretched frames x 8 mel bands
(`metrics.TOKEN_FRAMES/BANDS`), so each event's ground-truth region is dilated by 4 frames and
4 bands each way before the mask's mass inside it is counted; chance is the dilated region's
share of the mask grid.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import metrics, spectral
from . import world


EMPTY = 1e-3   # a mask whose mean is below this keeps (next to) nothing: < 64 of 64,064 cells


def held_out_scenes(n_scenes: int, seed: int = 0) -> list[world.Scene]:
    return [world.render_scene(world.scene_seed(seed, "test", i)) for i in range(n_scenes)]


def prompt_rows(explainer: Any, n_scenes: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """Explain each held-out scene for the prompt of every event it holds and of one event it
    lacks (drawn with numpy's generator seeded 0): one row per (scene, prompt) with ``scene``,
    ``event``, ``present``, ``mask_mean``; for present prompts also ``mass`` (share of the mask
    inside the event's dilated region), ``chance`` (that region's share of the grid), ``other``
    (share of the mask inside the other present events' dilated regions and outside its own: what
    it keeps of the rest of the scene's events rather than of the background), ``gap``
    |similarity - masked similarity| and ``empty`` (mask mean below `EMPTY`); the scene's first
    row also ``corr``, the correlation of its first two events' masks where it has two and neither
    is constant. `localization_report` and `by_event` summarise these rows."""
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for i, scene in enumerate(held_out_scenes(n_scenes, seed)):
        present = [e.name for e in scene.events]
        lacking = str(rng.choice([n for n in world.EVENTS if n not in present]))
        results = explainer.explain_prompts(scene.wave, [world.prompt_for(n) for n in present + [lacking]])
        first = len(rows)
        regions = {name: metrics.dilate(scene.mel_masks[name]) for name in present}
        for name, r in zip(present, results):
            region = regions[name]
            others = np.zeros_like(region)
            for other in present:
                if other != name:
                    others |= regions[other]
            rows.append({"scene": i, "event": name, "present": True, "mask_mean": float(r.mask_mean),
                         "mass": metrics.mass_in_region(r.mask, region), "chance": float(region.mean()),
                         "other": metrics.mass_in_region(r.mask, others & ~region),
                         "gap": abs(r.similarity - r.masked_similarity), "empty": bool(r.mask_mean < EMPTY)})
        rows.append({"scene": i, "event": lacking, "present": False, "mask_mean": float(results[-1].mask_mean)})
        if len(present) >= 2 and results[0].mask.std() > 0 and results[1].mask.std() > 0:
            rows[first]["corr"] = float(np.corrcoef(results[0].mask.ravel(), results[1].mask.ravel())[0, 1])
    return rows


def localization_report(explainer: Any, n_scenes: int = 12, seed: int = 0,
                        rows: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Whether explanations are right, over `prompt_rows` (computed here unless given). Means over
    (scene, present event): ``mass`` share of the mask inside the event's dilated region, ``chance``
    that region's share of the grid and ``other`` the share on the scene's other events; ``matched``
    / ``absent`` mask means for present / absent prompts and ``ratio`` = absent / matched; ``gap``
    (and ``gap_max``) |similarity - masked similarity| for present prompts; ``prompt_corr`` the
    correlation of the masks of a scene's first two events' prompts where neither is constant (1:
    the same mask whatever the prompt); ``empty`` the share of present prompts whose mask keeps less
    than ``EMPTY`` of the grid (a decoder that has given up on those events: their masks drive
    ``gap``, and a randomization check on them compares blank masks)."""
    rows = prompt_rows(explainer, n_scenes, seed) if rows is None else rows
    on = [r for r in rows if r["present"]]
    matched = np.mean([r["mask_mean"] for r in on])
    absent = np.mean([r["mask_mean"] for r in rows if not r["present"]])
    corr = [r["corr"] for r in rows if "corr" in r]
    gap = [r["gap"] for r in on]
    out = {"mass": np.mean([r["mass"] for r in on]), "chance": np.mean([r["chance"] for r in on]),
           "other": np.mean([r["other"] for r in on]),
           "matched": matched, "absent": absent, "ratio": absent / max(matched, 1e-12),
           "gap": np.mean(gap), "gap_max": np.max(gap), "prompt_corr": np.mean(corr) if corr else np.nan,
           "empty": np.mean([r["empty"] for r in on]),
           "scenes": len({r["scene"] for r in rows})}
    return {k: float(v) for k, v in out.items()}


def by_event(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`prompt_rows`' present prompts grouped by event kind: for each kind that occurs, ``n``
    prompts and the means of ``mass``, ``chance``, ``other``, ``mask_mean`` and ``gap`` and the
    share ``empty``. Where the overall mass falls short, this says which events a decoder misplaces
    (mass near chance with a real mask), keeps with the rest of the scene (a high ``other``), or
    gives up on (a mask mean near `EMPTY`)."""
    return per_event([r for r in rows if r["present"]], ("mass", "chance", "other", "mask_mean", "gap", "empty"))


def per_event(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Rows grouped by their ``event``, in `world.EVENTS` order: for each kind that occurs, ``n``
    rows and the mean of each of `keys`."""
    out: dict[str, dict[str, float]] = {}
    for name in world.EVENTS:
        mine = [r for r in rows if r["event"] == name]
        if mine:
            out[name] = {"n": float(len(mine)), **{k: float(np.mean([r[k] for r in mine])) for k in keys}}
    return out


@torch.no_grad()
def oracle_rows(clap: Any, n_scenes: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """The *perfect* explanation under this CLAP: every held-out scene of `localization_report`
    masked to exactly one present event's ground-truth cells (everything else at the floor a zero
    mask gives), for that event's prompt. One row per (scene, present event): ``event``,
    ``events`` (how many the scene holds), ``scene`` the prompt's similarity to the whole scene and
    ``alone`` to the masked one."""
    rows: list[dict[str, Any]] = []
    for scene in held_out_scenes(n_scenes, seed):
        present = [e.name for e in scene.events]
        mel = spectral.mel_power(spectral.power(spectral.stft(torch.from_numpy(scene.wave)[None])))
        audio, _ = clap.encode(spectral.to_db(mel))
        text = clap.encode_text([world.prompt_for(n) for n in present])
        truth = torch.stack([torch.from_numpy(scene.mel_masks[n]).float() for n in present])
        masked, _ = clap.encode(spectral.masked_log_mel_from_mel(mel.expand(len(present), -1, -1), truth))
        for name, whole, alone in zip(present, (text @ audio[0]).tolist(), (text * masked).sum(-1).tolist()):
            rows.append({"event": name, "events": len(present), "scene": whole, "alone": alone})
    return rows


def oracle_report(clap: Any, n_scenes: int = 12, seed: int = 0,
                  rows: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """What the perfect explanation (`oracle_rows`, computed here unless given) scores: the mean
    similarity gap (alone - scene: > 0 when the CLAP scores an event alone above the scene), its
    mean absolute value ``gap`` as `localization_report` counts it, and ``gap_<n>`` over scenes of
    n events. Where ``gap`` is over the 0.1 bound, a mask that isolates the prompted event cannot
    also keep the similarity: LMAC-ZS's similarity term then favours masks that keep some of the
    other events, and the fix belongs to the CLAP, not the decoder."""
    rows = oracle_rows(clap, n_scenes, seed) if rows is None else rows
    signed_a = np.array([r["alone"] - r["scene"] for r in rows])
    count_a = np.array([r["events"] for r in rows])
    out = {"signed_gap": signed_a.mean(), "gap": np.abs(signed_a).mean()}
    out.update({f"gap_{n}": np.abs(signed_a[count_a == n]).mean() for n in np.unique(count_a)})
    return {k: float(v) for k, v in out.items()}


def oracle_by_event(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`oracle_rows` grouped by event kind: ``n`` and the means of ``scene``, ``alone`` and
    ``overshoot`` (alone - scene). LMAC-ZS's similarity term is an L1 on the difference, so an event
    whose overshoot is well above 0 is one whose isolating mask the objective charges for scoring
    too *high*: a decoder lowers the similarity back by keeping some of the scene's other events
    (`by_event`'s ``other``)."""
    out = per_event(rows, ("scene", "alone"))
    for v in out.values():
        v["overshoot"] = v["alone"] - v["scene"]
    return out


def randomization_report(explainer: Any, n_scenes: int = 4, seed: int = 0) -> dict[str, float]:
    """`evaluate.cascading_ssim` of the explainer's LMAC-ZS masks, each scene explained for its
    first event's prompt: mean SSIM to the intact model's masks per re-initialised stage, from the
    projection down. Masks that explain the classifier fall as its stages are re-initialised;
    masks that stay put come from the decoder itself."""
    from ..baselines import BaselineSettings
    from ..evaluate import cascading_ssim

    clap = explainer.clap
    scenes = held_out_scenes(n_scenes, seed)
    text = clap.encode_text([world.prompt_for(s.events[0].name) for s in scenes]).to(explainer.device)
    waves = torch.from_numpy(np.stack([s.wave for s in scenes])).to(explainer.device)
    target = torch.arange(n_scenes, device=explainer.device)
    per_stage = cascading_ssim(clap, explainer.decoder, explainer.domain, text, BaselineSettings(), ["lmaczs"],
                               waves, target, seed)
    return {stage: v["lmaczs"] for stage, v in per_stage.items()}
