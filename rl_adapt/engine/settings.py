"""The settings of an adaptation run: :class:`AdaptConfig` (``configs/adapt*.yaml``, every key documented below it)
and :class:`AdaptInputs` (the files a run reads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rl_adapt.cleanup import CleanupConfig
from rl_adapt.config import bounded
from rl_adapt.engine.corrector import CorrectorConfig
from rl_adapt.engine.ppo import PPOConfig
from rl_adapt.engine.reward.network import RewardNetConfig
from rl_adapt.engine.rollout import RolloutConfig
from rl_adapt.engine.shape_prior import ShapePriorConfig
from rl_adapt.harmonize import HarmonizeConfig
from rl_adapt.postprocessing import CANDIDATES
from rl_adapt.training.finetune import FineTuneConfig
from rl_adapt.training.styled_source import PAIR_MODES, StyledSourceConfig


@dataclass
class SourceTeacherConfig:
    """What the labelled source data (``--source-data``) teaches the loop besides the shape prior: source images
    restyled toward the target's look (estimated from the unlabelled target images), with their true labels.
    No target label is read."""

    enabled: bool = False
    """Use it (needs ``--source-data``)."""
    pairs: StyledSourceConfig = field(default_factory=StyledSourceConfig)
    """Which source images are restyled, and how."""
    held_out: float = bounded(0.2, ge=0.0, lt=1.0)
    """Fraction of the pairs kept out of training: the guard's judge when ``guard: styled_source``."""
    supervised_coef: float = bounded(1.0, ge=0.0)
    """Weight of the cross-entropy on the training pairs in every PPO minibatch (0: none)."""
    reward: bool = True
    """The reward network also learns, on the training pairs, where the policy's own masks are wrong
    (targets ``mask == true label``): boundary information the automatic corrections of target masks lack."""
    reward_images: int = bounded(256, ge=0)
    """At most this many training pairs (seeded subset) enter the reward network's data each iteration (0: all)."""
    warm_start: FineTuneConfig = field(default_factory=lambda: FineTuneConfig(steps=0))
    """Supervised fine-tuning on the training pairs before the first iteration (nnU-Net's loss and augmentation;
    ``steps: 0``: none): the loop then adapts what the styled-source baseline would deliver."""
    kl_reference: str = bounded("warm_start", choices=("source", "warm_start"))
    """The frozen policy of PPO's KL term: the source network, or the warm-started one (when there is one)."""
    draws: int = bounded(1, ge=1)
    """Restyling draws to choose from: each draw restyles the source images and warm-starts the policy with its own
    seed (draw 0 with the run's), and the run keeps the draw whose warm-started policy scores best on the target
    images by ``draw_score``, label-free. Which draw a seed gives moves the outcome on real images (results/camus220);
    each extra draw costs one restyling, one warm start and one correction pass. Needs ``warm_start.steps > 0``."""
    draw_score: str = bounded("agreement", choices=("agreement", "validity"))
    """How draws are told apart, on the target images, without labels: ``agreement`` (mean Dice of the automatic
    corrections to the warm-started policy's masks: fewer edits needed) or ``validity`` (fraction of those masks
    anatomically valid). Ties go to the lower draw."""
    draw_modes: list[str] = field(default_factory=list)
    """The restyling mode of each draw, in draw order (one of ``pairs.mode``'s choices per draw; empty: every draw
    uses ``pairs.mode``). Mixing modes lets ``draw_score`` choose, label-free, between a fitted scanner model
    (``scanner``: close when the target's scanner is of the model's kind) and spectra and profiles estimated
    directly (``degrade``: no such assumption). Needs one entry per draw."""
    draw_merge: str = bounded("best", choices=("best", "average"))
    """What the run keeps of its draws: ``best`` (the draw ``draw_score`` ranks first: its warm start and its pairs) or
    ``average`` (the uniform average of every draw's warm-started weights, all fine-tuned from the same source
    network; the best draw's pairs still teach PPO and judge the guard, and every draw holds out the same source
    patients, so the guard's held-out pairs stay unseen). ``average`` needs ``draws > 1``."""

    def __post_init__(self) -> None:
        if self.draw_modes and len(self.draw_modes) != self.draws:
            raise ValueError(f"source_teacher.draw_modes has {len(self.draw_modes)} entries for {self.draws} draws: "
                             "give one restyling mode per draw (or none)")
        unknown = sorted(set(self.draw_modes) - set(PAIR_MODES))
        if unknown:
            raise ValueError(f"source_teacher.draw_modes: unknown mode(s) {unknown}; choose from {list(PAIR_MODES)}")
        if self.draw_merge == "average" and self.draws < 2:
            raise ValueError("source_teacher.draw_merge: average needs source_teacher.draws > 1 (there is nothing to "
                             "average with one draw)")
        if self.draws > 1 and self.warm_start.steps <= 0:
            raise ValueError("source_teacher.draws > 1 needs source_teacher.warm_start.steps > 0: draws are told apart "
                             "by the warm-started policy's masks on the target images")


@dataclass
class AdaptConfig:
    """Everything an adaptation run needs besides its inputs. Loaded from ``configs/adapt*.yaml``."""

    seed: int = 0
    """Master seed; each stage derives its own seed from it (same seed, same run on CPU)."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:1" or "auto" (CUDA when available)."""
    threads: int = bounded(0, ge=0)
    """torch CPU threads (0: leave torch's default)."""
    iterations: int = bounded(4, ge=1)
    """Rounds of rollout -> correct -> reward -> PPO."""
    max_target_images: int = bounded(0, ge=0)
    """Use at most this many target images (0: all), picked with the seed."""
    ppo_images_per_iteration: int = bounded(512, ge=1)
    """Target images (one-step episodes) PPO consumes per iteration."""
    correction_reward_weight: float = bounded(0.0, ge=0.0, le=1.0)
    """Weight w of the corrected masks in the PPO reward: per pixel r = w * 1[label == corrected] + (1 - w) *
    reward_net, for target images whose correction is anatomically valid (w = 0 elsewhere). 0 is RL4Seg's
    pure learned reward; see README (measured: PPO exploits a small CPU-trained reward network)."""
    myo_la_contact_penalty: float = bounded(0.0, ge=0.0)
    """Subtracted from the per-pixel reward of every MYO pixel touching an LA pixel and every LA pixel touching a
    MYO pixel (8-neighbourhood) in the sampled segmentation: the anatomy check ``frontier_myo_la`` as a
    per-pixel penalty. 0: off."""
    lv_bg_contact_penalty: float = bounded(0.0, ge=0.0)
    """Subtracted from the per-pixel reward of every LV pixel touching a background pixel (8-neighbourhood) in the
    sampled segmentation: the anatomy check ``frontier_lv_bg`` as a per-pixel penalty. 0: off."""
    keep_if_closer: bool = True
    """Guard against reward hacking: keep an iteration's PPO weights only if the judge (``guard``) says the policy
    got better; otherwise the iteration keeps the previous weights (logged as ``rejected``)."""
    guard_tolerance_se: float = bounded(0.0, ge=0.0)
    """The guard rejects a PPO phase only if its judge falls by more than this many standard errors of the mean
    paired per-image change over the judged images (0: any fall, however small). On 168 held-out restyled pairs one
    standard error was 0.0004-0.0015 Dice in the CAMUS-220 runs (results/camus220)."""
    guard: str = bounded("corrections", choices=("corrections", "styled_source"))
    """What the guard judges by. ``corrections``: the policy's argmax agrees better (mean Dice over LV/MYO/LA) with
    that iteration's corrected masks than before PPO, on the images with expert masks when ``--expert`` gives any,
    else on the whole target set; on real images the corrections are ~99 % the source's own masks, so any change
    lowers it. ``styled_source``: the policy's Dice on the held-out restyled source images (true labels, see
    ``source_teacher``) does not fall: a signal that can rise when masks get better."""
    trusted_corrections: str = bounded("valid", choices=("valid", "all"))
    """Which corrections the reward network learns from, the PPO reward blends in
    (``correction_reward_weight``) and the export's postprocessing is decided against: ``valid`` (only the
    anatomically valid ones; RL4Seg) or ``all`` (every correction, valid or not: for a source model whose outputs
    the corrector cannot make valid, e.g. at a coarse patch size or briefly trained). With fewer than 2 trusted
    corrections the first iteration stops with an error saying what to try; a later iteration keeps the previous
    weights (recorded as ``rejected`` with the reason, as the guard does) and the run goes on."""
    train_on: str = bounded("all", choices=("all", "expert"))
    """Which target images the loop trains on: ``all`` (every image given as ``--target``; the expert masks, if
    any, override the automatic corrections of their images) or ``expert`` (only the images with an expert mask;
    needs ``--expert``). Measured on real CAMUS (CPU, small plan, low-gain shift, expert masks for 10 of 50
    patients, Dice on the other 40): ``all`` +0.014, ``expert`` +0.046 (+0.041 / +0.077 with
    ``ppo.supervised_coef`` 1.0): on real images the automatic corrections of the other images carry no boundary
    information and dilute the expert signal (results/camus_shift.md)."""
    pseudo_labels: bool = False
    """Self-training on the target (RL4Seg's pseudo-ground truth): the target images whose automatic correction
    is accepted (anatomically valid and within Dice ``corrector.dice_threshold`` of the policy's mask; expert
    masks excepted) join the PPO update's supervised cross-entropy with that correction as the mask, at the
    weight of the term they join (``source_teacher.supervised_coef`` with the source teacher, else
    ``ppo.supervised_coef``; 0 there: off). No target label is read. Off in the configs: CAMUS-220 dev patients,
    64 px, seed 0, against ``configs/adapt_cpu.yaml`` without it, blur -0.0005 [-0.0022, +0.0010], a foreign scanner
    -0.0015 [-0.0031, +0.0000] Dice (results/camus220/README.md)."""
    postprocessing: tuple[str, ...] = ()
    """Postprocessing candidates (of :data:`rl_adapt.postprocessing.CANDIDATES`) tried at export, nnU-Net's greedy
    way but label-free: a step is kept when it raises the final policy's agreement with the last iteration's
    anatomically valid corrections (no label worse). The kept steps are stored with the adapted model as
    ``postprocessing.json``/``.pkl`` (nnU-Net's format), which ``predict`` and ``evaluate`` apply. Empty: none."""
    postprocessing_validity_tolerance: float = bounded(0.01, ge=0.0, le=1.0)
    """The ``anatomical_cleanup`` candidate is also kept when it raises the anatomical validity of the final
    policy's outputs on all target images and no label's agreement with the trusted corrections falls by more
    than this (Dice). 0: agreement alone decides, as nnU-Net's Dice does."""
    postprocessing_cleanup: CleanupConfig = field(default_factory=lambda: CleanupConfig(myo_la_frontier_max=0.11))
    """Clean-up parameters of the ``anatomical_cleanup`` candidate (the corrector's clean-up, with the MYO-LA
    separation on: measured, it is what leaves cleaned CPU-adapted outputs invalid otherwise)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout settings."""
    corrector: CorrectorConfig = field(default_factory=CorrectorConfig)
    """Automatic correction (clean-up, shape prior, pseudo-label acceptance)."""
    shape_prior: ShapePriorConfig = field(default_factory=ShapePriorConfig)
    """Shape autoencoder trained on the label maps of ``--source-data`` (or read from ``--shape-prior``); a run
    with ``corrector.use_shape_prior`` and neither input is refused before it starts."""
    reward: RewardNetConfig = field(default_factory=RewardNetConfig)
    """Reward network and its training."""
    source_teacher: SourceTeacherConfig = field(default_factory=SourceTeacherConfig)
    """Restyled source images with true labels: supervision, reward data and the guard's judge."""
    harmonize: HarmonizeConfig = field(default_factory=HarmonizeConfig)
    """Map every target image toward the source's look (:mod:`rl_adapt.harmonize`, fitted label-free on the target
    and ``--source-data`` images) before anything else sees it; the map is stored with the adapted model
    (``harmonization.npz``), and ``predict``/``evaluate`` apply it. Needs ``--source-data``."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(beta_kl_final=0.0125, ent_coef_final=0.0375))
    """Pixel-wise PPO; ``beta_kl``/``ent_coef`` go linearly to ``*_final`` over the iterations (RL4Seg: 4x smaller)."""

    def __post_init__(self) -> None:
        if self.guard == "styled_source" and not self.source_teacher.enabled:
            raise ValueError("guard: styled_source needs source_teacher.enabled: true")
        unknown = [c for c in self.postprocessing if c not in CANDIDATES]
        if unknown:
            raise ValueError(f"postprocessing: unknown candidate(s) {unknown}; valid: {list(CANDIDATES)}")


@dataclass
class AdaptInputs:
    """The files a run reads (never written).

    :param model_dir: the source nnU-Net results folder.
    :param target_dir: unlabelled target images (any reader format; labels, if any, are ignored).
    :param source_data: optional labelled source dataset (its label maps train the shape prior).
    :param expert_dir: optional folder of expert-corrected masks named like the target cases.
    :param val_dir: optional labelled target set, only to report progress (never trained on).
    :param shape_prior: optional trained shape prior (``shape_prior.pt`` of an earlier run on the same source
        domain); used instead of training one from ``source_data``.
    """

    model_dir: Path
    target_dir: Path
    source_data: Path | None = None
    expert_dir: Path | None = None
    val_dir: Path | None = None
    shape_prior: Path | None = None
