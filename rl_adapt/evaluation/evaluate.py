"""Score segmentation models on a labelled set: metrics, anatomical validity, clinical indices.

:func:`evaluate` runs every model on every labelled case (sliding window, original geometry) and writes,
into a new folder (built in a temporary sibling and renamed at the end). Until then ``out/unfinished/`` keeps each
model's finished predictions (one stage per model, :mod:`rl_adapt.engine.stages`), so a killed evaluation continues
with ``resume`` without predicting those models again; a failure before any model finished leaves nothing:

* ``per_image.csv`` -- one row per (case, model): case, patient, view, phase, model, ``<S>_<metric>`` for
  S in LV/MYO/LA/epi and metric in dice/hd/hd95/assd (mm), ``mean_<metric>`` (mean over LV/MYO/LA),
  ``valid``, ``failed_checks`` (``;``-joined) and one ``check_<name>`` column (1 passed / 0 failed) per check;
* ``per_patient.csv`` -- one row per (patient, model) for patients with 2CH and 4CH at ED and ES:
  ``<index>_pred``, ``<index>_ref`` (the same method on the ground-truth masks), ``<index>_err``
  (pred - ref), ``<index>_err_pct`` for volumes, and ``<index>_meta`` / ``<index>_err_meta`` where the
  dataset's metadata carries EF/EDV/ESV;
* ``summary.json`` -- the shape scripts read (see :func:`summarise`), strict JSON (undefined -> ``null``), with
  ``summary["warnings"]``: ``blank_images`` (images with one grey value, scored anyway) and
  ``left_out_of_clinical_indices`` (images not in a complete 2CH/4CH x ED/ES patient, and why), each with a
  ``count`` and the ``message`` also logged as a WARNING (None when the count is 0);
* ``overlays.npz`` -- downsampled image, ground truth, each model's mask (and the reward network's
  uncertainty) of the cases the report shows; ``reliability.json`` when a reward network is given;
  ``timings.json`` (seconds per stage); ``report.html`` (:mod:`rl_adapt.evaluation.report`);
* ``postprocessed/per_image.csv`` and ``postprocessed/per_patient.csv`` when a postprocessing rule applies (see
  :attr:`EvaluateConfig.postprocessing`): the same tables for every model's outputs after that one rule, summarised
  under ``summary["postprocessed"]`` (same shape as the raw summary, paired against the first model postprocessed
  the same way) with the rule under ``summary["postprocessing"]``. The raw tables and summary are unchanged.

Undefined metric values (an empty structure) are NaN in memory, empty cells in CSV, ``null`` in JSON; every
mean is NaN-aware and its count is reported under ``summary["counts"]``.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rl_adapt.config import bounded, bounds_problem
from rl_adapt import distributed as dist
from rl_adapt.engine.reward.network import RewardNet
from rl_adapt.errors import InputError, RLAdaptError
from rl_adapt.evaluation.inputs import (find_reward_net, load_labelled, load_model, parse_comparisons, parse_model_specs,
                                        resolve_postprocessing)
from rl_adapt.evaluation.overlays import overlay_arrays, select_overlays
from rl_adapt.evaluation.reliability import reward_reliability
from rl_adapt.evaluation.report import write_report
from rl_adapt.evaluation.scoring import (clinical_exclusions, clinical_row, complete_patients, image_metric_columns,
                                         patient_columns, patient_indices_or_empty, score_image, summarise)
from rl_adapt.engine.run_state import finished_record, without_keys
from rl_adapt.engine.stages import Stages, kept_stages
from rl_adapt.io_utils import atomic_dir, json_clean, save_npz, write_csv, write_json_atomic
from rl_adapt.preflight import check_device, check_output, warn_blank_images

log = logging.getLogger(__name__)

EARLIER_OUTPUT: tuple[str, ...] = ("summary.json", "inputs.json")
"""What makes a folder an earlier evaluation, the only kind ``--overwrite`` replaces."""
UNFINISHED = "unfinished"
"""The folder inside ``out`` of an unfinished evaluation: its finished predictions, until the tables are written."""


@dataclass
class Masks:
    """The prediction stage's result: one model's masks of every case, in the cases' order."""
    masks: list[np.ndarray]
    """(H, W) uint8 label maps, one per case (shapes may differ between cases)."""

    def save(self, path: Path) -> None:
        """Write them to one compressed ``.npz`` atomically."""
        save_npz(path, **{f"m{i}": m for i, m in enumerate(self.masks)})

    @classmethod
    def load(cls, path: Path) -> "Masks":
        """Read what :meth:`save` wrote."""
        with np.load(path) as d:
            return cls([d[f"m{i}"] for i in range(len(d.files))])

MAX_LISTED = 20
"""Case names listed per warning in ``summary.json``."""


@dataclass
class EvaluateConfig:
    """How :func:`evaluate` runs; every field has a safe default."""
    mirror: bool = False
    """Test-time mirroring (nnU-Net's flip averaging); slower, usually a small gain."""
    overlays: int = bounded(4, ge=0)
    """Cases per overlay group in the report (helped most, hurt most, random)."""
    thumb_size: int = bounded(128, ge=8)
    """Longest side (pixels) of the overlay thumbnails saved for the report."""
    n_bootstrap: int = bounded(2000, ge=1)
    """Bootstrap resamples for the paired confidence intervals."""
    seed: int = bounded(0, ge=0)
    """Seed of the bootstrap and of the random overlay cases."""
    reliability_bins: int = bounded(10, ge=1)
    """Equal-width confidence bins of the reward network's reliability diagram."""
    workers: int = bounded(-1, ge=-1)
    """Processes computing metrics and clinical indices while prediction runs (-1: one per CPU core, at
    most 4, so every core stays busy during and after prediction; 0: everything in this process)."""
    torch_threads: int = bounded(1, ge=0)
    """Torch CPU threads for prediction (0: leave torch's setting). One thread per image is the fastest on
    small CPUs: batch-1 forwards of small networks scale poorly across threads, and the other cores run
    the metric workers at the same time."""
    device: str = "cpu"
    """Torch device of the models ("cpu", "cuda")."""
    report: bool = True
    """Write report.html next to the tables."""
    reward_model: str = ""
    """Whose masks the reward network scores (``--reward``): a model name (e.g. the adapted one, whose uncertainty
    map users see); empty: the first model."""
    compare: list[str] = field(default_factory=list)
    """Paired comparisons besides every model against the first, as ``"NAME:REFERENCE"`` (e.g.
    ``"rl_adapted:styled-source"``: what the adaptation adds over a baseline); both names among the models."""
    postprocessing: str = "auto"
    """Postprocessing rule applied, in addition to the raw outputs, to EVERY model compared (see
    :mod:`rl_adapt.postprocessing`): "auto" = the rule stored in the model folders (``postprocessing.json``; all
    folders that carry one must carry the same rule; none: raw only), "none" = raw only, or the path of a
    ``postprocessing.json`` (or of a model folder holding one)."""

    def __post_init__(self) -> None:
        problem = bounds_problem(self, "EvaluateConfig")
        if problem:
            raise ValueError(problem)


class _Runner:
    """CPU jobs (metrics, clinical indices) in forked worker processes as soon as they are submitted, so
    they overlap with prediction; inline when ``workers`` is 0 or fork is unavailable."""

    def __init__(self, workers: int, torch_threads: int = 1):
        n = workers if workers >= 0 else max(1, min(4, os.cpu_count() or 1))
        self.pool = None
        if n >= 1 and "fork" in mp.get_all_start_methods():
            self.pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork"))

    def submit(self, fn, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # delivered when .result() is called, as from a pool
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def finished_settings(specs: Mapping[str, Path], data: str | Path, reward: str | Path | None,
                      cfg: EvaluateConfig) -> dict:
    """What a finished evaluation's results depend on, as ``inputs.json`` records it: the models, data and reward
    (resolved paths) and every config field but where and how fast it ran (device, workers, threads)."""
    return without_keys({"inputs": {"models": {n: str(Path(p).resolve()) for n, p in specs.items()},
                                    "data": str(Path(data).resolve()),
                                    "reward": None if reward is None else str(Path(reward).resolve())},
                         "cfg": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}},
                        ("cfg.device", "cfg.workers", "cfg.torch_threads"))


def evaluate(models: Mapping[str, str | Path] | Sequence[str], data: str | Path, out: str | Path,
             reward: str | Path | None = None, config: EvaluateConfig | None = None, overwrite: bool = False,
             progress: bool = True, resume: bool = False) -> dict:
    """Evaluate models on a labelled dataset and write the evaluation folder ``out`` (see module doc).

    :param models: ``{name: results_folder}`` in order (the first is the reference of paired tests), or
        ``["NAME=DIR", ...]``.
    :param data: labelled dataset (any format :func:`rl_adapt.data.readers.read_dataset` reads).
    :param out: new output folder (built in a temporary sibling, renamed at the end).
    :param reward: adaptation run folder (or reward_net.pt) whose reward network is scored as uncertainty.
    :param overwrite: replace an existing ``out`` that is an earlier evaluation (holds summary.json and
        inputs.json); any other existing folder is refused.
    :param resume: continue the unfinished evaluation in ``out`` (same models, data and mirroring): the models whose
        predictions it finished are not predicted again; a new evaluation if there is none. Under ``torchrun`` the
        predictions are sharded and not kept (a resumed job predicts again). A finished evaluation in ``out`` with
        the same :func:`finished_settings`: its summary, nothing redone.
    :returns: the summary dict as written to ``summary.json`` (strict-JSON values: None for undefined).
    :raises InputError: bad model folder, unlabelled/empty/mismatched dataset, missing reward network,
        existing ``out`` without ``overwrite`` or ``resume``, ``out`` that is, is inside or holds an input, unwritable
        ``out``, unavailable device -- raised before anything is written.
    :raises RLAdaptError: ``resume`` with other models, data or mirroring than the unfinished evaluation's, or with
        other settings than a finished one's (:func:`finished_settings`; the keys are named).
    """

    cfg = config or EvaluateConfig()
    specs = dict(models) if isinstance(models, Mapping) else parse_model_specs(models)
    specs = {str(k): Path(v) for k, v in specs.items()}
    if not specs:
        raise InputError(None, "give at least one model")
    if cfg.reward_model and cfg.reward_model not in specs:
        raise InputError(None, f"--reward-model {cfg.reward_model!r} is not one of the models given: {list(specs)}")
    parse_comparisons(cfg.compare, list(specs))  # a bad --compare is refused before any work
    out = Path(out)
    world = dist.current()

    def preflight() -> dict | None:
        """The summary of a finished evaluation ``resume`` asks for again (same settings), else None."""
        unfinished = resume and (out / UNFINISHED).is_dir()
        if resume and not overwrite and not unfinished and (out / "summary.json").is_file():
            finished_record(out / "inputs.json", finished_settings(specs, data, reward, cfg), "evaluation")
            return json.loads((out / "summary.json").read_text(encoding="utf-8"))
        check_output(out, evaluation_inputs(specs, data, reward, cfg.postprocessing), may_exist=overwrite or resume,
                     earlier_output=(UNFINISHED,) if unfinished else EARLIER_OUTPUT, command="rl-adapt evaluate",
                     exists_hint="choose a new output folder, pass --overwrite to replace an earlier evaluation, or "
                                 "--resume to continue an interrupted one")
        check_device(cfg.device)
        return None

    finished = dist.on_main(preflight, world)
    if finished is not None:
        return finished
    given: dict[str, list[np.ndarray]] | None = None
    if world.active:  # every rank predicts its shard of the cases; rank 0 scores and writes, as one process would
        given = _predict_sharded(specs, data, cfg, world, progress)
        if not world.main:  # rank 0 hands on its summary, or the message of what stopped it
            result = dist.broadcast_object(None, world)
            if isinstance(result, str):
                raise RLAdaptError(result)
            return result
        try:
            summary = _evaluate_resumably(specs, data, out, reward, cfg, progress, given, resume)
        except RLAdaptError as exc:
            dist.broadcast_object(str(exc), world)
            raise
        return dist.broadcast_object(summary, world)
    return _evaluate_resumably(specs, data, out, reward, cfg, progress, given, resume)


def _evaluate_resumably(specs: Mapping[str, Path], data, out: Path, reward, cfg: EvaluateConfig, progress: bool,
                        given: Mapping[str, list[np.ndarray]] | None, resume: bool) -> dict:
    """:func:`_evaluate` with the finished predictions kept in ``out/unfinished/`` (removed with ``out`` when
    nothing finished; without ``resume`` an unfinished folder left in an earlier evaluation by an interrupted
    ``--overwrite`` is discarded)."""
    if not resume and (out / UNFINISHED).is_dir():
        shutil.rmtree(out / UNFINISHED)
    settings = {"inputs": {"models": {n: str(p.resolve()) for n, p in specs.items()},
                           "data": str(Path(data).resolve())},
                "cfg": {"mirror": cfg.mirror}}
    with kept_stages(out, out / UNFINISHED, settings, "evaluation") as stages:  # other models or data: refused
        return _evaluate(specs, data, out, reward, cfg, stages, progress, given)


def _predict_sharded(specs: Mapping[str, Path], data, cfg: EvaluateConfig, world: dist.World,
                     progress: bool) -> dict[str, list[np.ndarray]]:
    """Each rank's predictions of its shard of the cases, gathered: ``{model: [(H, W) uint8 mask per case]}``."""
    cases = load_labelled(data, progress=False)
    mine = dist.shard(len(cases), world)
    device = dist.device_of(world, cfg.device)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    out = {}
    with torch.inference_mode():
        for name, path in specs.items():
            model = load_model(path, device)
            part = [np.asarray(model.predict(cases[i].image, cases[i].spacing, mirror=cfg.mirror), dtype=np.uint8)
                    for i in tqdm(mine, desc=f"predict {name} [rank {world.rank}]", unit="img",
                                  disable=None if progress and world.main else True)]
            out[name] = dist.gather_shards(part, len(cases), world)
    return out


def _evaluate(specs: Mapping[str, Path], data, out: Path, reward, cfg: EvaluateConfig, stages: Stages,
              progress: bool, given: Mapping[str, list[np.ndarray]] | None) -> dict:
    """:func:`evaluate` in one process; ``given`` holds every model's masks when a data-parallel job predicted them,
    otherwise each model's prediction is a stage of ``stages``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cases = load_labelled(data, progress=progress)
    blank = warn_blank_images(cases, "scored anyway")
    loaded = {name: load_model(path, cfg.device) for name, path in specs.items()}
    harmonized = [name for name, m in loaded.items() if m.harmonizer is not None]
    if harmonized:
        log.info("the images are harmonized (the folder's harmonization.npz) before %s", ", ".join(harmonized))
    post = resolve_postprocessing(specs, cfg.postprocessing)
    if post is not None:
        log.info("postprocessing for every model: %s (from %s)", post.describe(), post.source)
    reward_net = None
    if reward is not None:
        reward_net = RewardNet.load(find_reward_net(reward), device=cfg.device)
    timings["load"] = time.perf_counter() - t0


    names = list(loaded)
    preds: dict[str, list[np.ndarray]] = {}
    patients = complete_patients(cases)
    left_out = clinical_exclusions(cases, patients)
    if left_out["count"]:
        log.warning("%s", left_out["message"])
    runner = _Runner(cfg.workers, cfg.torch_threads)
    cpu0 = _cpu_seconds()
    threads_before = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        t0 = time.perf_counter()
        img_futs: dict[str, list[Future]] = {}
        clin_futs: dict[tuple[str, str], Future] = {}
        pp_img_futs: dict[str, list[Future]] = {}
        pp_clin_futs: dict[tuple[str, str], Future] = {}
        for patient, idx in patients.items():
            sel = [cases[i] for i in idx]
            clin_futs[("", patient)] = runner.submit(patient_indices_or_empty, sel, [c.label for c in sel])
        with torch.inference_mode():
            for k, (name, model) in enumerate(loaded.items()):
                def predict_all(model=model, name=name) -> tuple[Masks, dict]:
                    found = [np.asarray(model.predict(c.image, c.spacing, mirror=cfg.mirror), dtype=np.uint8)
                             for c in tqdm(cases, desc=f"predict {name}", unit="img",
                                           disable=None if progress else True)]
                    return Masks(found), {"images": len(found)}

                masks = list(given[name]) if given is not None else \
                    stages.run(f"predict/{name}", out / UNFINISHED / f"predict_{k:02d}.npz", predict_all,
                               Masks.load).masks
                futs = []
                for m, c in zip(masks, cases):
                    if m.shape != c.label.shape:
                        raise InputError(c.source or data, f"{c.name}: model {name!r} returned shape {m.shape}, "
                                                           f"label is {c.label.shape}")
                    futs.append(runner.submit(score_image, m, c.label, tuple(c.spacing)))
                preds[name], img_futs[name] = masks, futs
                for patient, idx in patients.items():
                    clin_futs[(name, patient)] = runner.submit(
                        patient_indices_or_empty, [cases[i] for i in idx], [masks[i] for i in idx])
                if post is not None:
                    pp_masks = [np.asarray(post(m), dtype=np.uint8) for m in masks]
                    pp_img_futs[name] = [runner.submit(score_image, m, c.label, tuple(c.spacing))
                                         for m, c in zip(pp_masks, cases)]
                    for patient, idx in patients.items():
                        pp_clin_futs[(name, patient)] = runner.submit(
                            patient_indices_or_empty, [cases[i] for i in idx], [pp_masks[i] for i in idx])
        timings["predict"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        def collect_images(futures: Mapping[str, list[Future]], tag: str) -> list[dict]:
            rows: list[dict] = []
            for n in names:
                for c, fut in zip(cases, tqdm(futures[n], desc=f"metrics {n}{tag}", unit="img",
                                              disable=None if progress else True)):
                    head = {"case": c.name, "patient": c.meta.get("patient", ""), "view": c.meta.get("view", ""),
                            "phase": c.meta.get("phase", ""), "model": n}
                    rows.append({**head, **fut.result()})
            return rows

        def collect_patients(futures: Mapping[tuple[str, str], Future]) -> list[dict]:
            rows = []
            for patient, idx in patients.items():
                ref = clin_futs[("", patient)].result()
                meta = {k: cases[idx[0]].meta.get(k) for k in ("EF", "EDV", "ESV")}
                for n in names:
                    rows.append(clinical_row(patient, n, futures[(n, patient)].result(), ref, meta))
            return rows

        image_rows = collect_images(img_futs, "")
        pp_image_rows = collect_images(pp_img_futs, " (postprocessed)") if post is not None else []
        timings["metrics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        patient_rows = collect_patients(clin_futs)
        pp_patient_rows = collect_patients(pp_clin_futs) if post is not None else []
        timings["clinical"] = time.perf_counter() - t0
    finally:
        runner.close()
        torch.set_num_threads(threads_before)
    timings["cpu_predict_metrics_clinical"] = _cpu_seconds() - cpu0

    rel, ece = None, None
    if reward_net is not None:
        t0 = time.perf_counter()
        scored = cfg.reward_model or names[0]
        rel = reward_reliability(reward_net, loaded[scored], cases, n_bins=cfg.reliability_bins,
                                 seed=cfg.seed, progress=progress)
        rel.update({"model": scored, "reward_run": str(reward)})
        ece = {scored: rel["ece"]}
        timings["reward"] = time.perf_counter() - t0

    pairs = parse_comparisons(cfg.compare, names)
    summary = summarise(image_rows, patient_rows, names, ece=ece, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                        pairs=pairs)
    summary["harmonized_inputs"] = harmonized  # models whose folder maps each image toward the source look first
    summary["warnings"] = {
        "blank_images": {"count": len(blank), "cases": blank[:MAX_LISTED],
                         "message": f"{len(blank)} of {len(cases)} images are blank (every pixel the same value): "
                                    "scored anyway, their masks mean nothing" if blank else None},
        "left_out_of_clinical_indices": left_out,
    }
    if rel is not None:  # the reward network against the true labels: everywhere, and near the borders
        summary["reward"] = {"model": rel["model"], "ece": rel["ece"], "auroc": rel["auroc"],
                             "border_px": rel["border_px"], "border_ece": rel["border"]["ece"],
                             "border_auroc": rel["border"]["auroc"], "error_rate": rel["error_rate"],
                             "border_error_rate": rel["border"]["error_rate"],
                             # the model's own softmax confidence on the same pixels: what the reward must beat
                             "confidence_auroc": rel["policy_confidence"]["everywhere"]["auroc"],
                             "confidence_border_auroc": rel["policy_confidence"]["border"]["auroc"]}
    if post is not None:
        summary["postprocessed"] = summarise(pp_image_rows, pp_patient_rows, names, n_bootstrap=cfg.n_bootstrap,
                                             seed=cfg.seed, pairs=pairs)
        summary["postprocessing"] = {**post.to_json(), "rule": post.describe(), "source": post.source,
                                     "applied_to": names}

    t0 = time.perf_counter()
    chosen = select_overlays(image_rows, [c.name for c in cases], names, cfg.overlays, cfg.seed)
    overlays = overlay_arrays(chosen, cases, preds, image_rows, names, cfg.thumb_size,
                               reward_net, loaded[cfg.reward_model or names[0]])
    timings["overlays"] = time.perf_counter() - t0

    check_cols = []
    for r in image_rows:
        check_cols.extend(k for k in r if k.startswith("check_") and k not in check_cols)
    image_cols = ["case", "patient", "view", "phase", "model", *image_metric_columns(), "valid", "failed_checks",
                  *check_cols]
    with atomic_dir(out, overwrite=True) as tmp:  # replaces the unfinished folder (or an earlier evaluation) at once
        tmp = Path(tmp)
        write_csv(tmp / "per_image.csv", image_rows, image_cols)
        write_csv(tmp / "per_patient.csv", patient_rows, patient_columns())
        if post is not None:
            (tmp / "postprocessed").mkdir()
            write_csv(tmp / "postprocessed" / "per_image.csv", pp_image_rows, image_cols)
            write_csv(tmp / "postprocessed" / "per_patient.csv", pp_patient_rows, patient_columns())
        write_json_atomic(tmp / "summary.json", json_clean(summary))
        if rel is not None:
            write_json_atomic(tmp / "reliability.json", json_clean(rel))
        if overlays is not None:
            np.savez_compressed(tmp / "overlays.npz", **overlays)
        write_json_atomic(tmp / "inputs.json", {"models": {n: str(p) for n, p in specs.items()}, "data": str(data),
                                                 "reward": None if reward is None else str(reward),
                                                 "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                                 "settings": finished_settings(specs, data, reward, cfg)})
        if cfg.report:
            t0 = time.perf_counter()
            write_json_atomic(tmp / "timings.json", {k: round(v, 3) for k, v in timings.items()})
            write_report(tmp)
            timings["report"] = time.perf_counter() - t0
        write_json_atomic(tmp / "timings.json", {k: round(v, 3) for k, v in timings.items()})
    log.info("evaluation written to %s (%s)", out, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return json_clean(summary)


def evaluation_inputs(specs: Mapping[str, Path], data: str | Path, reward: str | Path | None,
                      postprocessing: str = "auto") -> dict[str, Path | None]:
    """Every path an evaluation reads, named as on the command line: the output may not touch any of them.

    The reward network counts as its file (an evaluation may be written inside the adaptation run folder it
    scores, not over it).
    """
    inputs: dict[str, Path | None] = {"--data": Path(data)}
    inputs.update({f"--model {name}": Path(path) for name, path in specs.items()})
    inputs["--reward"] = None if reward is None else find_reward_net(reward)
    inputs["--postprocessing"] = None if postprocessing in ("auto", "none") else Path(postprocessing)
    return inputs


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
