"""The adaptation loop (RL4Seg): rollout -> correct -> reward network -> pixel-wise PPO, repeated.

One run folder holds everything a run produces::

    RUN/config.yaml            the exact configuration used
    RUN/state.json             finished stages (see :mod:`rl_adapt.engine.run_state`)
    RUN/metrics.jsonl          one JSON line per finished stage with its figures
    RUN/iter{k}/rollout.npz    argmax + sampled masks of the policy on every target image (uint8)
    RUN/iter{k}/corrected.npz  corrected masks, which correction path was used, pseudo-label acceptance
    RUN/iter{k}/reward_net.pt  the reward network of iteration k
    RUN/iter{k}/policy.pt      the policy network's weights after PPO of iteration k
    RUN/shape_prior.pt         the shape autoencoder (trained once on source label maps, if given)
    RUN/styled_source.npz      with ``source_teacher``: the restyled source images, their labels, the held-out split
    RUN/warm_start.pt          with ``source_teacher.warm_start``: the policy after the supervised warm start
    RUN/draws/draw{d}/         with ``source_teacher.draws`` > 1: each restyling draw's pairs and warm start, removed
                               once the chosen draw's are copied to the two files above
    RUN/tensorboard/           PPO and reward-net logs
    RUN/model/<Dataset>/nnUNetTrainer__<Plans>__2d/   the adapted model, an nnU-Net results folder (with
                               postprocessing.json/.pkl when ``postprocessing`` names candidates)
    RUN/reward_net.pt          the final reward network (its ``1 - score`` is the uncertainty map)

Every stage writes its outputs atomically and only then is marked finished, so ``--resume`` after a
``kill -9`` at any moment redoes at most the stage that was running (:mod:`rl_adapt.engine.stages`). Under
``torchrun`` the per-image stages are sharded over the processes and the trainers are data-parallel
(:mod:`rl_adapt.engine.sharding`, :mod:`rl_adapt.distributed`). Target labels are never read.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rl_adapt import distributed as dist
from rl_adapt.config import config_sha, save_config, to_dict
from rl_adapt.data.readers import read_dataset
from rl_adapt.engine.corrector import Corrections, Corrector
from rl_adapt.engine.guard import judge
from rl_adapt.engine.ppo import PolicyWeights, PPOConfig, ppo_phase
from rl_adapt.engine.reward.blend import BlendedReward
from rl_adapt.engine.reward.dataset import build_reward_dataset
from rl_adapt.engine.reward.network import RewardNet, train_reward_net
from rl_adapt.engine.rollout import Rollout, policy_outputs
from rl_adapt.engine.sharding import sharded_argmax, sharded_correction, sharded_rollout
from rl_adapt.engine.run_state import RunState
from rl_adapt.engine.shape_prior import ShapePrior, train_shape_prior
from rl_adapt.engine.settings import AdaptConfig, AdaptInputs, SourceTeacherConfig
from rl_adapt.engine.stages import Stages
from rl_adapt.errors import ConfigError, InputError, RLAdaptError
from rl_adapt.io_utils import atomic_path, write_json_atomic
from rl_adapt.measures.anatomy import is_valid
from rl_adapt.measures.metrics import segmentation_metrics
from rl_adapt.harmonize import FILE_NAME as HARMONIZATION_FILE
from rl_adapt.harmonize import Harmonizer, fit_harmonizer
from rl_adapt.policies.nnunet import export_model_folder, load_model_folder
from rl_adapt.postprocessing import decide, postprocessing_files
from rl_adapt.preflight import check_device, check_output, match_expert_names, warn_blank_images
from rl_adapt.training.finetune import fine_tune
from rl_adapt.training.styled_source import (StyledPairs, chosen_mode, remember_restyling, restyling_record,
                                             styled_source_pairs)

log = logging.getLogger(__name__)

STYLED_PICTURE = "styled_source.png"
"""The run's picture of its restyling (:meth:`StyledPairs.picture`): source, restyled source and target patches."""

__all__ = ["AdaptConfig", "AdaptInputs", "Adapter", "SourceTeacherConfig"]


def _stage_seed(seed: int, iteration: int, stage: int) -> int:
    """The seed of one stage of one iteration, derived from the run's master seed."""
    return int(seed) * 1000 + iteration * 10 + stage


class _GivenFile:
    """A stage result that is an existing file (the user's, or an earlier stage's): saved as a byte copy, with the
    object it holds (``value``)."""

    def __init__(self, source: Path, value) -> None:
        self.source, self.value = source, value

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            shutil.copyfile(self.source, tmp)

    @classmethod
    def load_with(cls, load):
        """A loader for :meth:`Stages.run` that reads the copy back with ``load``."""
        return lambda path: cls(path, load(path))


class Adapter:
    """Runs (or resumes) one adaptation run. See the module docstring for the run folder.

    :param inputs: what the run reads.
    :param cfg: the run configuration.
    :param run_dir: the run folder; must not exist unless ``resume``.
    :param resume: continue a run in ``run_dir`` (same configuration).
    :param progress: show progress bars.
    """

    def __init__(self, inputs: AdaptInputs, cfg: AdaptConfig, run_dir: str | Path, resume: bool = False,
                 progress: bool = True):
        self.inputs = inputs
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.world = dist.current()
        self.progress = progress and self.world.main
        self.device = check_device(dist.device_of(self.world, cfg.device))
        settings = {"cfg": to_dict(cfg), "inputs": self._inputs_dict()}
        self._created = dist.on_main(lambda: self._prepare_run_folder(resume, settings), self.world)
        self.state = RunState(self.run_dir, config_sha(settings), settings)
        self.stages = Stages(self.state, self.run_dir / "metrics.jsonl", self.world)
        self.teacher: StyledPairs | None = None  # the restyled source pairs, once their stage ran
        self._source_cases = None  # the labelled source cases, once a restyling read them
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)

    def _prepare_run_folder(self, resume: bool, settings: dict) -> bool:
        """Check every input and the run folder, create it (or check a resumed one's settings); True when created.
        Rank 0 of a data-parallel job does this alone."""
        self._check_inputs()
        check_output(self.run_dir, {"--model": self.inputs.model_dir, "--target": self.inputs.target_dir,
                                    "--source-data": self.inputs.source_data, "--expert": self.inputs.expert_dir,
                                    "--val": self.inputs.val_dir, "--shape-prior": self.inputs.shape_prior},
                     may_exist=resume, earlier_output=("config.yaml",), command="rl-adapt adapt",
                     exists_hint="choose a new run folder, or pass --resume to continue the run in it")
        if resume and not (self.run_dir / "state.json").exists():
            log.info("%s: nothing to resume, starting a new run", self.run_dir)
        created = not self.run_dir.exists()
        if (self.run_dir / "state.json").exists():
            RunState(self.run_dir, config_sha(settings), settings)  # refuses other settings, naming them
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (self.run_dir / "config.yaml").exists():
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_json_atomic(self.run_dir / "inputs.json", self._inputs_dict())
        return created

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        """Run every unfinished stage; returns the adapted nnU-Net model folder. A run folder this call created is
        removed again when the run fails before any stage finished (e.g. an unreadable target image)."""
        try:
            return self._run()
        except BaseException:
            if self.world.main and self._created and not self.state.completed and self.run_dir.is_dir():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _run(self) -> Path:
        self._load()
        self._validate_source()
        prior = self._shape_prior()
        self.teacher = self._styled_source(prior)
        self._warm_start()
        net: torch.nn.Module | None = None  # the policy as it stands, kept in memory from one iteration to the next
        weights: PolicyWeights | None = None
        reward_net: RewardNet | None = None
        for k in range(self.cfg.iterations):
            if self.stages.done(f"iter{k}/ppo"):
                continue
            net = net if net is not None else self._network_at(k)
            roll = self.stages.run(f"iter{k}/rollout", self._path(k, "rollout.npz"),
                                   lambda: sharded_rollout(net, self.images, self.cfg.rollout,
                                                           _stage_seed(self.cfg.seed, k, 1), self.world),
                                   Rollout.load, parallel=True)
            corr = self.stages.run(f"iter{k}/correct", self._path(k, "corrected.npz"),
                                   lambda: sharded_correction(self._corrector(prior), roll.argmax, self._names(),
                                                              self.world),
                                   Corrections.load, parallel=True)
            trusted = self._trusted(corr.valid)
            reward_net = self._reward(k, net, roll, corr, trusted)
            weights = self.stages.run(f"iter{k}/ppo", self._path(k, "policy.pt"),
                                      lambda: self._ppo(k, net, reward_net, corr, trusted, roll.argmax),
                                      PolicyWeights.load, parallel=True)
        self._warn_if_every_phase_was_rejected()
        if net is None:  # every iteration finished in an earlier process
            net = self._network_at(self.cfg.iterations)
        if reward_net is None:
            reward_net = RewardNet.load(self._path(self.cfg.iterations - 1, "reward_net.pt"), device=self.device)
        return self._export(net, reward_net, weights.argmax if weights is not None else None)

    def _path(self, k: int, name: str) -> Path:
        return self.run_dir / f"iter{k}" / name

    def _names(self) -> list[str]:
        return [c.name for c in self.target_cases]

    def _corrector(self, prior: ShapePrior | None) -> Corrector:
        return Corrector(self.cfg.corrector, shape_prior=prior, expert=self.expert)

    # ------------------------------------------------------------------ inputs
    def _inputs_dict(self) -> dict:
        return {k: (None if v is None else str(Path(v).resolve())) for k, v in dataclasses.asdict(self.inputs).items()}

    def _check_inputs(self) -> None:
        if self.cfg.train_on == "expert" and self.inputs.expert_dir is None:
            raise InputError(self.inputs.target_dir, "train_on: expert needs expert masks (--expert DIR)")
        for name in ("model_dir", "target_dir", "source_data", "expert_dir", "val_dir", "shape_prior"):
            p = getattr(self.inputs, name)
            if p is not None and not Path(p).exists():
                raise InputError(p, f"{name.replace('_', ' ')} does not exist")
        if self.cfg.harmonize.when != "never" and self.inputs.source_data is None:
            raise ConfigError(f"harmonize.when: {self.cfg.harmonize.when} maps the target images toward the source "
                              "images' look: give the source dataset (--source-data DIR)")
        if self.cfg.source_teacher.enabled and self.inputs.source_data is None:
            raise ConfigError("source_teacher.enabled needs the labelled source dataset (--source-data DIR)")
        if (self.cfg.corrector.use_shape_prior and self.inputs.source_data is None
                and self.inputs.shape_prior is None):
            raise ConfigError("the configuration corrects masks with a shape prior (corrector.use_shape_prior: true) "
                              "but none can be had: give the labelled source dataset (--source-data DIR) or a "
                              "trained prior (--shape-prior FILE), or turn it off (--set "
                              "corrector.use_shape_prior=false)")
        if self.inputs.shape_prior is not None:
            ShapePrior.load(self.inputs.shape_prior, device="cpu")  # a foreign file: one clear line, before any work

    def _load(self) -> None:
        self.model = load_model_folder(self.inputs.model_dir, device=str(self.device))
        cases = read_dataset(self.inputs.target_dir, with_labels=False)
        if not cases:
            raise InputError(self.inputs.target_dir, "no target images found")
        if self.cfg.max_target_images and len(cases) > self.cfg.max_target_images:
            rng = np.random.default_rng(self.cfg.seed)
            keep = sorted(rng.choice(len(cases), self.cfg.max_target_images, replace=False))
            cases = [cases[i] for i in keep]
        if self.model.harmonizer is not None:
            raise InputError(self.inputs.model_dir, f"carries {HARMONIZATION_FILE} (an adapted model): adapt from the "
                                                    "original source model folder")
        self.target_cases = cases
        self.harmonizer = self._harmonizer() if self._harmonizes() else None
        if self.harmonizer is not None:  # every later stage sees the target images as the adapted model will
            self.target_cases = cases = [dataclasses.replace(c, image=self.harmonizer.apply(c.image)) for c in cases]
        self.warnings: dict[str, int] = {}
        blank = warn_blank_images(cases, "adapted on anyway")
        if blank:
            self.warnings["blank_target_images"] = len(blank)
        patches = [self.model.to_patch(c.image, c.spacing)[0] for c in cases]
        self.images = torch.stack([torch.as_tensor(p) for p in patches]).float().to(self.device)
        log.info("target: %d images -> patches %s", len(cases), tuple(self.images.shape))
        # the frozen policy of PPO's KL term: the source network (the warm start's, with source_teacher.kl_reference)
        self.reference = copy.deepcopy(self.model.network).to(self.device).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.val_cases = None
        if self.inputs.val_dir is not None:
            self.val_cases = [c for c in read_dataset(self.inputs.val_dir, with_labels=True) if c.label is not None]
            if not self.val_cases:
                raise InputError(self.inputs.val_dir, "validation set has no labelled cases")
            if self.harmonizer is not None:
                self.val_cases = [dataclasses.replace(c, image=self.harmonizer.apply(c.image)) for c in self.val_cases]
        self.expert = self._load_expert()
        if self.cfg.train_on == "expert":
            keep = self._expert_indices()
            if not keep:
                raise InputError(self.inputs.expert_dir, "train_on: expert, but no expert mask is named like a "
                                                         "target image")
            log.info("train_on expert: training on the %d of %d target images with an expert mask",
                     len(keep), len(self.target_cases))
            self.target_cases = [self.target_cases[i] for i in keep]
            self.images = self.images[torch.as_tensor(keep, device=self.images.device)]
        if not self.stages.done("inputs"):  # what the run read, with the warnings a user must not miss
            self.stages.mark("inputs", {"n_target": len(self.target_cases), "n_expert": len(self.expert),
                                        **{f"warning_{k}": v for k, v in self.warnings.items()}})

    def _harmonizes(self) -> bool:
        """Whether this run harmonizes the target images (``harmonize.when``); ``auto`` is decided once, label-free, by
        the restyling's mode choice on the raw target images (stage ``harmonize_choice``; its scanner fit is cached
        for the restyling stage)."""
        when = self.cfg.harmonize.when
        if when != "auto":
            return when == "always"
        stage = "harmonize_choice"
        if not self.stages.done(stage):
            def decide() -> None:
                t0 = time.time()
                choice = chosen_mode(self._labelled_source(), self.target_cases, self.cfg.source_teacher.pairs)
                self.stages.mark(stage, {**choice, "harmonize": choice["mode"] == "degrade",
                                         "seconds": time.time() - t0})
            dist.on_main(decide, self.world)
            self.state.reload()
        return bool(self.stages.info(stage)["harmonize"])

    def _labelled_source(self) -> list:
        """The labelled cases of ``--source-data``, read once (the restyling and the harmonization share them)."""
        if self._source_cases is None:
            self._source_cases = read_dataset(self.inputs.source_data, with_labels=True)
        return [c for c in self._source_cases if c.label is not None]

    def _harmonizer(self) -> Harmonizer:
        """The ``harmonize`` stage: the target -> source map fitted on the target and source images (no label read),
        saved as ``harmonization.npz`` and exported with the adapted model."""
        def fit() -> tuple[Harmonizer, dict]:
            source = self._labelled_source()
            h = fit_harmonizer([c.image for c in source], [c.image for c in self.target_cases], self.cfg.harmonize)
            return h, {"n_source": len(source), "n_target": len(self.target_cases)}
        return self.stages.run("harmonize", self.run_dir / HARMONIZATION_FILE, fit, Harmonizer.load)

    def _load_expert(self) -> dict[str, np.ndarray]:
        if self.inputs.expert_dir is None:
            return {}
        names = {c.name: i for i, c in enumerate(self.target_cases)}
        experts = read_dataset(self.inputs.expert_dir, with_labels=False)
        matched, unmatched = match_expert_names([c.name for c in experts], names)
        if not matched:
            raise InputError(self.inputs.expert_dir, f"none of its {len(experts)} expert masks is named like a target "
                                                     f"image (e.g. {experts[0].name if experts else '-'} vs "
                                                     f"{self.target_cases[0].name}); name them like the target cases")
        if unmatched:
            log.warning("%d of %d expert masks match no target image and are ignored (e.g. %s)", len(unmatched),
                        len(experts), ", ".join(unmatched[:3]))
            self.warnings["unmatched_expert_masks"] = len(unmatched)
        out = {}
        for case in experts:
            key = case.name
            if key not in names:
                continue
            tc = self.target_cases[names[key]]
            mask = np.asarray(case.image)
            if mask.shape != tc.image.shape:
                raise InputError(case.source or self.inputs.expert_dir,
                                 f"expert mask shape {mask.shape} != target image shape {tc.image.shape}")
            if mask.min() < 0 or mask.max() > 3:
                raise InputError(case.source or self.inputs.expert_dir, "expert mask has labels outside 0..3")
            out[key] = self._label_patch(tc.image, mask, tc.spacing)
        log.info("expert corrections: %d of %d target images", len(out), len(self.target_cases))
        return out

    def _label_patch(self, image: np.ndarray, label: np.ndarray, spacing) -> np.ndarray:
        """A label map (H, W) brought to the policy's patch geometry, (P0, P1) uint8 (as ``to_patch`` does images)."""
        return self.model.label_to_patch(image, label, spacing)

    def _network_at(self, iteration: int) -> torch.nn.Module:
        """Policy network as it stands at the start of ``iteration`` (the source's weights, or the warm start's, for
        0), read from the run."""
        net = copy.deepcopy(self.model.network).to(self.device)
        if iteration > 0:
            net.load_state_dict(PolicyWeights.load(self._path(iteration - 1, "policy.pt")).state)
        elif self.stages.done("warm_start"):
            net.load_state_dict(PolicyWeights.load(self.run_dir / "warm_start.pt").state)
        return net

    # ------------------------------------------------------------------ stages
    def _validate_source(self) -> None:
        if self.val_cases is not None and not self.stages.done("val_source"):
            self.stages.mark("val_source", self.validate(self.model.network))

    def _shape_prior(self) -> ShapePrior | None:
        """The shape prior stage: the user's prior copied into the run, or one trained on the source label maps."""
        if not self.cfg.corrector.use_shape_prior:
            return None
        path = self.run_dir / "shape_prior.pt"
        load = lambda p: ShapePrior.load(p, device=self.device)  # noqa: E731
        if self.inputs.shape_prior is not None:
            given = self.stages.run("shape_prior", path, self._given_shape_prior, _GivenFile.load_with(load))
            return given.value
        return self.stages.run("shape_prior", path, self._train_shape_prior, load)

    def _styled_source(self, prior: ShapePrior | None) -> StyledPairs | None:
        """The styled-source stage: source images restyled toward the target, true labels, a held-out split (with
        ``source_teacher.draws`` > 1, a copy of the chosen draw's)."""
        tc = self.cfg.source_teacher
        if not tc.enabled:
            return None
        if tc.draws > 1:
            self._choose_draw(prior)
            pairs = self._kept_draw("styled_source", "styled_source.npz", StyledPairs.load)
        else:
            pairs = self.stages.run("styled_source", self.run_dir / "styled_source.npz",
                                    lambda: self._restyle(self.cfg.seed), StyledPairs.load)
        self._source_cases = None  # every restyling is done: the source images need not stay in memory
        if self.world.main and not (self.run_dir / STYLED_PICTURE).is_file():
            pairs.picture(self.images, self.run_dir / STYLED_PICTURE)
        pairs.images, pairs.labels = pairs.images.to(self.device), pairs.labels.to(self.device)
        return pairs

    def _kept_draw(self, stage: str, filename: str, load):
        """Stage ``stage``: the kept draw's ``draws/draw{d}/<filename>`` byte-copied to ``RUN/<filename>``, with the
        figures that draw's own stage recorded; returns what ``load`` reads from it."""
        chosen = int(self.stages.info("draw_choice")["chosen"])
        source = self._draw_path(chosen, filename)
        figures = {k: v for k, v in self.stages.info(f"draw{chosen}/{stage}").items() if k != "seconds"}
        return self.stages.run(stage, self.run_dir / filename,
                               lambda: (_GivenFile(source, load(source)), {**figures, "draw": chosen}),
                               _GivenFile.load_with(load)).value

    def _restyle(self, seed: int, mode: str | None = None) -> tuple[StyledPairs, dict]:
        """Source pairs restyled toward the target with master seed ``seed`` (in restyling ``mode``; None: the
        configured ``pairs.mode``), split into training and held out."""
        tc = self.cfg.source_teacher
        how = tc.pairs if mode is None else dataclasses.replace(tc.pairs, mode=mode)
        source = self._labelled_source()  # read once, whatever the number of draws
        # a resumed run: the scanner fit (and mode choice) a done draw recorded; every draw records the same one
        any(remember_restyling(source, self.target_cases, how, info) for info in self.state.completed.values())
        pairs = styled_source_pairs(self.model, source, self.target_cases, how, seed=_stage_seed(seed, 0, 7),
                                    progress=self.progress)
        split_seed = self.cfg.seed if tc.draw_merge == "average" else seed  # averaged draws hold out the same patients
        pairs = pairs.split(tc.held_out, seed=_stage_seed(split_seed, 0, 8))
        info = {"n_pairs": len(pairs), "n_styled": int(pairs.styled.sum()), "n_held_out": int(pairs.held_out.sum()),
                **restyling_record(source, self.target_cases, how)}
        return pairs, info

    def _warm_start(self) -> None:
        """The warm-start stage: supervised fine-tuning on the restyled source pairs before iteration 0 (with
        ``source_teacher.draws`` > 1, a copy of the chosen draw's warm start)."""
        tc = self.cfg.source_teacher
        if self.teacher is None or tc.warm_start.steps <= 0:
            return
        if tc.draws > 1:
            if tc.draw_merge == "average":
                weights = self.stages.run("warm_start", self.run_dir / "warm_start.pt", self._average_draws,
                                          PolicyWeights.load, parallel=True)  # every rank: its argmax is sharded
            else:
                weights = self._kept_draw("warm_start", "warm_start.pt", PolicyWeights.load)
            if self.world.main:  # the kept (or averaged) warm start now lives in the run's own files
                shutil.rmtree(self.run_dir / "draws", ignore_errors=True)
        else:
            weights = self.stages.run("warm_start", self.run_dir / "warm_start.pt",
                                      lambda: self._warm(self.teacher, self.cfg.seed), PolicyWeights.load,
                                      parallel=True)
        if tc.kl_reference == "warm_start":
            self.reference.load_state_dict(weights.state)

    def _average_draws(self) -> tuple[PolicyWeights, dict]:
        """``draw_merge: average``: the uniform average of every draw's warm-started weights (floating-point entries;
        the others, if any, are draw 0's), with its Dice on the kept draw's held-out pairs."""
        tc = self.cfg.source_teacher
        states = [PolicyWeights.load(self._draw_path(d, "warm_start.pt")).state for d in range(tc.draws)]
        mean = {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
                for k, v in states[0].items()}
        net = copy.deepcopy(self.model.network).to(self.device)
        net.load_state_dict(mean)
        return PolicyWeights(state=mean), {"averaged_draws": len(states), **self._held_out_dice(net, self.teacher)}

    def _held_out_dice(self, net: torch.nn.Module, pairs: StyledPairs) -> dict:
        """With ``guard: styled_source``, the mean Dice of the source network's and of ``net``'s masks on the held-out
        ``pairs`` (``held_out_dice_source``, ``held_out_dice``); else nothing."""
        if self.cfg.guard != "styled_source":
            return {}
        held, truth = pairs.subset(pairs.held_out)
        before = judge(self._argmax(self.model.network, held), self._argmax(net, held), truth.cpu().numpy(),
                       np.arange(len(truth)), False)
        return {"held_out_dice_source": before.agreement_before, "held_out_dice": before.agreement_after}

    def _warm(self, pairs: StyledPairs, seed: int) -> tuple[PolicyWeights, dict]:
        """Supervised fine-tuning of the source network on the training ``pairs`` with master seed ``seed``."""
        tc = self.cfg.source_teacher
        net = copy.deepcopy(self.model.network).to(self.device)
        images, labels = pairs.subset(~pairs.held_out)
        losses = fine_tune(net, images, labels, tc.warm_start, seed=_stage_seed(seed, 0, 2),
                           device=self.device, what="warm start", progress=self.progress, world=self.world)
        info = {"steps": len(losses), "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
                **self._held_out_dice(net, pairs)}
        return PolicyWeights.of(net), info

    # ------------------------------------------------------------------ restyling draws
    def _draw_path(self, d: int, name: str) -> Path:
        return self.run_dir / "draws" / f"draw{d}" / name

    def _draw_seed(self, d: int) -> int:
        """Master seed of restyling draw ``d``; draw 0 has the run's own, so one draw is the run it always was."""
        return self.cfg.seed + 1000 * d

    def _choose_draw(self, prior: ShapePrior | None) -> int:
        """The ``draw_choice`` stage: restyle, warm-start and score every draw (each step a stage of its own, so a
        killed run resumes inside the draw it was at); the best-scoring draw's index."""
        tc = self.cfg.source_teacher
        if not self.stages.done("draw_choice"):
            scores = [self._score_draw(d, prior)[tc.draw_score] for d in range(tc.draws)]
            chosen = int(np.argmax(scores))  # the first of equals
            self.stages.mark("draw_choice", {"chosen": chosen, "score": tc.draw_score, "scores": scores})
            kept = ("its restyled pairs (the warm start: the average of every draw's)" if tc.draw_merge == "average"
                    else "its restyled pairs and warm start")
            log.info("restyling draws: %s %s; keeping draw %d: %s", tc.draw_score,
                     ", ".join(f"{x:.4f}" for x in scores), chosen, kept)
        return int(self.stages.info("draw_choice")["chosen"])

    def _score_draw(self, d: int, prior: ShapePrior | None) -> dict:
        """Draw ``d``'s label-free figures on the target images: ``validity`` of its warm-started policy's masks and
        ``agreement`` (mean Dice) of their automatic corrections with them."""
        name = f"draw{d}"
        if not self.stages.done(f"{name}/score"):
            seed = self._draw_seed(d)
            tc = self.cfg.source_teacher
            mode = tc.draw_modes[d] if tc.draw_modes else tc.pairs.mode
            pairs = self.stages.run(f"{name}/styled_source", self._draw_path(d, "styled_source.npz"),
                                    lambda: self._restyle(seed, mode), StyledPairs.load)
            pairs.images, pairs.labels = pairs.images.to(self.device), pairs.labels.to(self.device)
            weights = self.stages.run(f"{name}/warm_start", self._draw_path(d, "warm_start.pt"),
                                      lambda: self._warm(pairs, seed), PolicyWeights.load, parallel=True)
            t0 = time.time()
            net = copy.deepcopy(self.model.network).to(self.device)
            net.load_state_dict(weights.state)
            masks = self._argmax(net, self.images)
            summary = sharded_correction(self._corrector(prior), masks, self._names(), self.world)[1]
            self.stages.mark(f"{name}/score", {"seed": seed, "mode": mode,
                                               "validity": float(summary["validity_before"]),
                                               "agreement": float(summary["mean_dice_to_input"]),
                                               "seconds": time.time() - t0})
        return self.stages.info(f"{name}/score")

    def _given_shape_prior(self) -> tuple[_GivenFile, dict]:
        """The user's trained shape prior, copied byte for byte into the run (it stays self-contained)."""
        src = Path(self.inputs.shape_prior)
        return _GivenFile(src, ShapePrior.load(src, device=self.device)), {"from": str(src.resolve())}

    def _train_shape_prior(self) -> tuple[ShapePrior, dict]:
        cases = [c for c in read_dataset(self.inputs.source_data, with_labels=True) if c.label is not None]
        if not cases:
            raise InputError(self.inputs.source_data, "source dataset has no label maps for the shape prior")
        masks = np.stack([self._label_patch(c.image, c.label, c.spacing) for c in cases])
        return train_shape_prior(masks, self.cfg.shape_prior, device=self.device), {"n_masks": len(masks)}

    def _trusted(self, valid: np.ndarray) -> np.ndarray:
        """(N,) bool: the corrections the run trusts (see ``AdaptConfig.trusted_corrections``)."""
        return np.asarray(valid, bool) if self.cfg.trusted_corrections == "valid" else np.ones(len(valid), bool)

    def _too_few_trusted(self, k: int, trusted: np.ndarray) -> str:
        """Why iteration ``k`` cannot train a reward network: counts, the checks failed most, what to try."""
        info = self.stages.info(f"iter{k}/correct")
        failed = sorted(((v, c[len("failed_"):]) for c, v in info.items() if c.startswith("failed_")), reverse=True)
        worst = ", ".join(f"{name} ({count})" for count, name in failed[:3]) or "none recorded"
        hints = []
        if self.inputs.source_data is None and self.inputs.shape_prior is None:
            hints.append("a shape prior (--source-data DIR or --shape-prior FILE) makes more corrections valid")
        hints += ["expert masks (--expert DIR) replace the automatic corrections of their images",
                  "--set trusted_corrections=all trains on every correction, valid or not",
                  "a source model this far from valid anatomy may need more training or a finer plan"]
        return (f"iteration {k}: {int(trusted.sum())} of {len(trusted)} target images have an anatomically valid "
                f"correction; at least 2 are needed to train the reward network. Checks the corrections failed "
                f"most: {worst}. Try: " + "; ".join(hints) + ".")

    def _reward(self, k: int, net: torch.nn.Module, roll: Rollout, corr: Corrections,
                trusted: np.ndarray) -> RewardNet:
        """The reward stage of iteration ``k`` (with the fallback when too few corrections are trusted).

        :param trusted: (N,) bool, the corrections the reward network may learn from."""
        path = self._path(k, "reward_net.pt")
        load = lambda p: RewardNet.load(p, device=self.device)  # noqa: E731
        teaches = self.teacher is not None and self.cfg.source_teacher.reward
        if not self.stages.done(f"iter{k}/reward") and trusted.sum() < 2 and not teaches:
            why = self._too_few_trusted(k, trusted)
            if k == 0:
                raise RLAdaptError(why)
            # a later iteration falls back as the guard does: the previous weights and reward network stay
            log.warning("%s; keeping the weights of iteration %d", why, k - 1)
            if self.world.main:
                with atomic_path(path) as tmp:
                    shutil.copyfile(self._path(k - 1, "reward_net.pt"), tmp)
            dist.barrier(self.world)
            self.stages.mark(f"iter{k}/reward", {"skipped": True, "reason": "fewer than 2 trusted corrections",
                                                 "n_trusted": int(trusted.sum())})
        return self.stages.run(f"iter{k}/reward", path, lambda: self._train_reward(k, net, roll, corr, trusted), load,
                               parallel=True)

    def _train_reward(self, k: int, net: torch.nn.Module, roll: Rollout, corr: Corrections,
                      trusted: np.ndarray) -> tuple[RewardNet, dict]:
        idx = np.flatnonzero(trusted)
        dataset = None
        if len(idx):
            images = self.images[idx].cpu().numpy()
            segs = [roll.argmax[idx]] + [roll.samples[idx, s] for s in range(roll.samples.shape[1])]
            dataset = build_reward_dataset(images, segs, corr.corrected[idx], seed=_stage_seed(self.cfg.seed, k, 3))
        extra = {}
        if self.teacher is not None and self.cfg.source_teacher.reward:
            taught = self._source_reward_data(k, net)
            dataset = taught if dataset is None else dataset.concat(taught, prefix="source_")
            extra["n_source_images"] = int(len(taught.images))
        init = RewardNet.load(self._path(k - 1, "reward_net.pt"), device=self.device) if k > 0 else None
        reward_net, stats = train_reward_net(dataset, self.cfg.reward, device=self.device, init=init, world=self.world,
                                             progress=self.progress, seed=_stage_seed(self.cfg.seed, k, 3))
        return reward_net, {**stats, "n_images": int(len(idx)), **extra}

    def _source_reward_data(self, k: int, net: torch.nn.Module):
        """The policy's own masks on training pairs of the styled source, with targets ``mask == true label``."""
        tc = self.cfg.source_teacher
        train = np.flatnonzero(~self.teacher.held_out)
        rng = np.random.default_rng(_stage_seed(self.cfg.seed, k, 9))
        if tc.reward_images and len(train) > tc.reward_images:
            train = np.sort(rng.choice(train, tc.reward_images, replace=False))
        images = self.teacher.images[torch.as_tensor(train, device=self.device)]
        gen = torch.Generator(device=self.device).manual_seed(_stage_seed(self.cfg.seed, k, 6))
        argmax, sampled = policy_outputs(net, images, self.cfg.rollout.samples_per_image,
                                         self.cfg.rollout.batch_size, gen)
        segs = [argmax] + [sampled[:, s] for s in range(sampled.shape[1])]
        truth = self.teacher.labels[torch.as_tensor(train, device=self.device)].cpu().numpy()
        return build_reward_dataset(images.cpu().numpy(), segs, truth, seed=_stage_seed(self.cfg.seed, k, 10))

    def _ppo(self, k: int, net: torch.nn.Module, reward_net: RewardNet, corr: Corrections, trusted: np.ndarray,
             argmax_before: np.ndarray) -> tuple[PolicyWeights, dict]:
        """The PPO stage of iteration ``k``: trains ``net`` in place, then the guard keeps or undoes the phase."""
        skipped = self.stages.info(f"iter{k}/reward").get("skipped")
        if skipped:
            return PolicyWeights.of(net, argmax_before), {"rejected": True,
                                                          "reason": self.stages.info(f"iter{k}/reward")["reason"]}
        before_state = {k2: v.detach().clone() for k2, v in net.state_dict().items()}
        reward_fn = BlendedReward(reward_net, torch.as_tensor(corr.corrected, dtype=torch.int64, device=self.device),
                                  torch.as_tensor(trusted, device=self.device),
                                  self.cfg.correction_reward_weight, self.cfg.myo_la_contact_penalty,
                                  self.cfg.lv_bg_contact_penalty)
        ppo_cfg, supervised = self._supervised(corr)
        judge_before = self._styled_argmax(net) if self.cfg.guard == "styled_source" else None
        stats = ppo_phase(network=net, reference=self.reference, images=self.images, reward_fn=reward_fn,
                          cfg=ppo_cfg, total_images=-(-self.cfg.ppo_images_per_iteration // self.world.size),
                          iteration=k, n_iterations=self.cfg.iterations,
                          tensorboard_log=str(self.run_dir / "tensorboard") if self.world.main else None,
                          tb_name=f"ppo_iter{k}", progress=self.progress, supervised=supervised,
                          seed=_stage_seed(self.cfg.seed, k, 4), world=self.world)
        for name, p in net.state_dict().items():
            if torch.is_floating_point(p) and not torch.isfinite(p).all():
                raise RLAdaptError(f"iteration {k}: non-finite weights in {name}; last good checkpoint kept")
        argmax_after = self._argmax(net, self.images)
        if judge_before is not None:  # Dice on the held-out restyled source images (true labels)
            truth = self.teacher.subset(self.teacher.held_out)[1].cpu().numpy()
            verdict = judge(judge_before, self._styled_argmax(net), truth, np.arange(len(truth)),
                            self.cfg.keep_if_closer, self.cfg.guard_tolerance_se)
            what = "held-out restyled source images"
        else:
            verdict = judge(argmax_before, argmax_after, corr.corrected, self._guard_images(),
                            self.cfg.keep_if_closer, self.cfg.guard_tolerance_se)
            what = "corrected masks"
        if verdict.rejected:
            log.warning("iteration %d: PPO moved the policy away from the %s (agreement %.4f -> %.4f, standard "
                        "error of the change %.4f); keeping the previous weights", k, what, verdict.agreement_before,
                        verdict.agreement_after, verdict.change_se)
            net.load_state_dict(before_state)
        info = {**stats, "agreement_before": verdict.agreement_before, "agreement_after": verdict.agreement_after,
                "guard": self.cfg.guard, "guard_images": verdict.n_images, "guard_change_se": verdict.change_se,
                "rejected": verdict.rejected}
        if self.val_cases is not None:
            info.update(self.validate(net))
        return PolicyWeights.of(net, argmax_before if verdict.rejected else argmax_after), info

    def _argmax(self, net: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
        return sharded_argmax(net, images, self.cfg.rollout.batch_size, self.world)

    def _styled_argmax(self, net: torch.nn.Module) -> np.ndarray:
        """(M, H, W) uint8 argmax of ``net`` on the held-out restyled source pairs."""
        return self._argmax(net, self.teacher.subset(self.teacher.held_out)[0])

    def rejected_iterations(self) -> list[int]:
        """Iterations (0-based) whose finished PPO phase was rejected (by the guard, or for too few trusted
        corrections)."""
        return [k for k in range(self.cfg.iterations)
                if self.stages.done(f"iter{k}/ppo") and self.stages.info(f"iter{k}/ppo").get("rejected")]

    def _warn_if_every_phase_was_rejected(self) -> None:
        rejected = self.rejected_iterations()
        if rejected and len(rejected) == self.cfg.iterations:
            log.warning("every PPO phase (%d of %d) was rejected by the keep_if_closer guard: the adapted network is "
                        "the source network, only the stored postprocessing differs. The automatic corrections "
                        "gave PPO nothing it could agree with better; expert masks (--expert, train_on: expert) are "
                        "what helped on real images (README, results/camus_shift.md)", len(rejected),
                        self.cfg.iterations)

    def _expert_indices(self) -> list[int]:
        """Indices (into ``target_cases``/``images``) of the target images with an expert mask."""
        return [i for i, c in enumerate(self.target_cases) if c.name in self.expert]

    def _supervised(self, corr: Corrections) -> tuple[PPOConfig, tuple[torch.Tensor, torch.Tensor] | None]:
        """The PPO config and the (M, 1, H, W) images and (M, H, W) int64 masks of the PPO update's supervised term:
        the target patches with an expert mask (weight ``ppo.supervised_coef``), with ``pseudo_labels`` those with
        an accepted automatic correction of this iteration (``corr``), and with the source teacher its training
        pairs too (weight ``source_teacher.supervised_coef`` for all of them)."""
        idx = self._expert_indices()
        parts = []
        if idx:
            masks = np.stack([self.expert[self.target_cases[i].name] for i in idx])
            parts.append((self.images[torch.as_tensor(idx, device=self.images.device)],
                          torch.as_tensor(masks, dtype=torch.int64, device=self.images.device)))
        if self.cfg.pseudo_labels:
            pseudo = np.flatnonzero(np.asarray(corr.accepted, bool))
            pseudo = pseudo[~np.isin(pseudo, idx)]
            if len(pseudo):
                parts.append((self.images[torch.as_tensor(pseudo, device=self.images.device)],
                              torch.as_tensor(corr.corrected[pseudo], dtype=torch.int64, device=self.images.device)))
        cfg = self.cfg.ppo
        if self.teacher is not None and self.cfg.source_teacher.supervised_coef > 0:
            parts.append(self.teacher.subset(~self.teacher.held_out))
            cfg = dataclasses.replace(cfg, supervised_coef=self.cfg.source_teacher.supervised_coef)
        if cfg.supervised_coef <= 0 or not parts:
            return cfg, None
        return cfg, (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def _guard_images(self) -> np.ndarray:
        """Indices of the target images the ``keep_if_closer`` guard is judged on (see :class:`AdaptConfig`)."""
        with_expert = self._expert_indices()
        return np.asarray(with_expert if with_expert else range(len(self.target_cases)), dtype=np.int64)

    # ------------------------------------------------------------------ validation / export
    def validate(self, net: torch.nn.Module) -> dict[str, float]:
        """Mean Dice (LV/MYO/LA) and validity on the ``--val`` set with ``net`` (reporting only)."""
        saved = self.model.networks
        self.model.networks = [net.eval()]
        try:
            dices, valid = [], []
            for case in self.val_cases:
                pred = self.model.predict(case.image, case.spacing)
                m = segmentation_metrics(pred, case.label, case.spacing)
                dices.append(np.nanmean([m[s]["dice"] for s in ("LV", "MYO", "LA")]))
                valid.append(is_valid(pred))
        finally:
            self.model.networks = saved
        return {"val_dice": float(np.mean(dices)), "val_validity": float(np.mean(valid))}

    def _postprocessing_files(self, net: torch.nn.Module, argmax: np.ndarray) -> dict:
        """Decide the postprocessing label-free (see ``AdaptConfig.postprocessing``); the files to export.

        :param argmax: (N, H, W) uint8 argmax of ``net`` on the target patches.
        """
        t0 = time.time()
        last = self._path(self.cfg.iterations - 1, "corrected.npz")
        corr = Corrections.load(last)
        trusted = np.flatnonzero(self._trusted(corr.valid))
        rule, info = decide(argmax[trusted], corr.corrected[trusted], self.cfg.postprocessing,
                            cleanup=to_dict(self.cfg.postprocessing_cleanup), all_masks=argmax,
                            validity_tolerance=self.cfg.postprocessing_validity_tolerance)
        info = {**info, "reference": str(last.relative_to(self.run_dir)), "rule": rule.describe()}
        self.stages.log("postprocessing", {**info, "seconds": time.time() - t0})
        return postprocessing_files(rule, info)

    def _export(self, net: torch.nn.Module, reward_net: RewardNet, argmax: np.ndarray | None) -> Path:
        stage = "export"
        if not self.stages.done(stage):
            if self.cfg.postprocessing and argmax is None:
                argmax = self._argmax(net, self.images)  # every rank of a data-parallel job takes part

            def write() -> None:
                extra = self._postprocessing_files(net, argmax) if self.cfg.postprocessing else {}
                meta = {"rl_adapt_run": str(self.run_dir.resolve())}
                if self.harmonizer is not None:  # told in the checkpoint too: nnU-Net's own predictor skips the map
                    extra[HARMONIZATION_FILE] = self.run_dir / HARMONIZATION_FILE
                    meta["input_map"] = f"{HARMONIZATION_FILE}: rl-adapt predict/evaluate apply it to every image"
                out = export_model_folder(net, self.model, self.run_dir / "model", overwrite=True,
                                          extra_meta=meta, extra_files=extra)
                reward_net.save(self.run_dir / "reward_net.pt")
                self.stages.mark(stage, {"model_folder": str(out), "model_relpath": os.path.relpath(out, self.run_dir)})

            dist.on_main(write, self.world)
            self.state.reload()
        info = self.stages.info(stage)
        if "model_relpath" in info:  # relative to the run folder: still right after the folder is moved
            return self.run_dir / info["model_relpath"]
        return Path(info["model_folder"])  # runs exported before the relative path was stored
