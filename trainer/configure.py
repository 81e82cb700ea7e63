"""From the trainer settings to a model and its learner: ModelConfig, LearnerConfig, INIT_FROM.

Every value that cannot work raises :class:`~contract.errors.ConfigError`
naming the environment variable it came from (an individual variable such as
``STREAMREC_TRAINER_EMBED_DIM``, or the JSON object ``..._MODEL_OPTIONS``).
:func:`check_settings` does all the checks that need no catalog, at start-up;
:func:`build_learner` builds the model once the catalog is loaded (a fresh
model's category vocabulary is the catalog's) and a checkpoint, if any, read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from contract.errors import ConfigError
from trainer.catalog import Catalog
from trainer.checkpoint import PREVIOUS_FILE, Checkpoint, check_model_config, checkpoint_path
from trainer.device import DeviceError, resolve_device
from trainer.learner import ContinualLearner, LearnerConfig, LearnerError
from trainer.model import ModelError, build_model
from trainer.model_config import ModelConfig
from trainer.service_settings import ENV_PREFIX, TrainerSettings
from trainer.weights import WeightsError, WeightStore, config_mismatch, locate_version

log = logging.getLogger(__name__)

INIT_FROM = f"{ENV_PREFIX}INIT_FROM"


@dataclass(frozen=True)
class InitSource:
    """The published version of another deployment a fresh trainer starts from (INIT_FROM)."""

    store: WeightStore
    version: int


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors(include_url=False)[0]
    return (str(err["loc"][0]) if err["loc"] else ""), err["msg"]


def model_config_from(settings: TrainerSettings, fields: dict[str, Any]) -> ModelConfig:
    """A ModelConfig of these fields; a bad value raises ConfigError naming its variable."""
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        field, msg = _first_error(exc)
        raise ConfigError(settings.model_setting(field), f"{field}: {msg}") from None


def learner_config_from(settings: TrainerSettings) -> LearnerConfig:
    """The LearnerConfig of the settings; the learner's own dedupe is off (the feed dedupes)."""
    fields = settings.learner_overrides()
    if "dedup_window" in fields:
        raise ConfigError(f"{ENV_PREFIX}LEARNER_OPTIONS", "dedup_window: redelivered examples are dropped by "
                          f"the service's feed; set {ENV_PREFIX}DEDUPE_WINDOW instead")
    known = set(LearnerConfig.model_fields)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{ENV_PREFIX}LEARNER_OPTIONS",
                          f"unknown learner option(s) {unknown}; known: {sorted(known)}")
    try:
        return LearnerConfig(**fields, dedup_window=0)
    except ValidationError as exc:
        field, msg = _first_error(exc)
        raise ConfigError(settings.learner_setting(field), f"{field}: {msg}") from None


def init_config(settings: TrainerSettings, source_config: dict[str, Any]) -> ModelConfig:
    """This deployment's model config when it starts from a published version: the settings,
    with the category vocabulary of the source unless STREAMREC_TRAINER_CATEGORIES is given."""
    fields = settings.model_overrides()
    if "categories" not in fields:
        fields["categories"] = list(source_config.get("categories", []))
    return model_config_from(settings, fields)


def check_init_from(settings: TrainerSettings) -> InitSource | None:
    """Validate STREAMREC_TRAINER_INIT_FROM: a published version whose model config matches the
    configured one (checked only when no checkpoint will win over it)."""
    if settings.init_from is None:
        return None
    try:
        store, version = locate_version(settings.init_from)
        man = store.manifest(version)
    except (WeightsError, OSError) as exc:
        raise ConfigError(INIT_FROM, str(exc)) from exc
    if checkpoint_path(settings.checkpoint_dir).exists() or (Path(settings.checkpoint_dir) / PREVIOUS_FILE).exists():
        return InitSource(store, version)  # the checkpoint wins (logged at start); nothing to match
    expected = init_config(settings, man.model_config).model_dump(mode="json")
    try:
        diffs = config_mismatch(man.model_config, expected)
    except WeightsError as exc:
        raise ConfigError(INIT_FROM, str(exc)) from exc
    if diffs:
        raise ConfigError(
            INIT_FROM,
            f"version {version} in {store.url} was published for another model config "
            f"({'; '.join(diffs)}); set the model settings to match it",
        )
    return InitSource(store, version)


def check_settings(settings: TrainerSettings) -> InitSource | None:
    """Every check that needs no catalog, at start-up (not after the catalog load); the INIT_FROM source."""
    model_config_from(settings, settings.model_overrides())
    source = check_init_from(settings)
    learner_config_from(settings)
    try:
        resolve_device(settings.device)
    except DeviceError as exc:
        raise ConfigError(f"{ENV_PREFIX}DEVICE", str(exc)) from exc
    return source


def model_config_for(
    settings: TrainerSettings, source: InitSource | None, ckpt: Checkpoint | None, catalog: Catalog
) -> ModelConfig:
    """The config of the model to train: the checkpoint's vocabulary when resuming, the source's
    when starting from INIT_FROM, else the catalog's."""
    if ckpt is None and source is not None:
        try:
            source_config = source.store.manifest(source.version).model_config
        except (WeightsError, OSError) as exc:
            raise ConfigError(INIT_FROM, str(exc)) from exc
        return init_config(settings, source_config)
    fields = settings.model_overrides()
    if "categories" not in fields:
        # The category vocabulary is fixed when a model is born: from the checkpoint when
        # resuming, from the catalog on a fresh start (a new category later is not a new head).
        if ckpt is not None and "categories" in ckpt.model_config:
            fields["categories"] = list(ckpt.model_config["categories"])
        else:
            fields["categories"] = catalog.category_names()
    return model_config_from(settings, fields)


def build_learner(
    settings: TrainerSettings, source: InitSource | None, ckpt: Checkpoint | None, catalog: Catalog
) -> ContinualLearner:
    """The model (from INIT_FROM on a fresh start) and its learner; the checkpoint is loaded by the caller."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    config = model_config_for(settings, source, ckpt, catalog)
    if ckpt is not None:
        check_model_config(ckpt.model_config, config.model_dump(mode="json"), where=str(settings.checkpoint_dir))
    try:
        model = build_model(config)
    except ModelError as exc:
        raise ConfigError(f"{ENV_PREFIX}ENCODER_PATH / {ENV_PREFIX}MODEL_OPTIONS", str(exc)) from exc
    if source is not None:
        if ckpt is not None:
            log.info("checkpoint in %s wins over %s=%s: resuming from the checkpoint, not initialising "
                     "from version %d", settings.checkpoint_dir, INIT_FROM, settings.init_from, source.version)
        else:
            try:
                man = source.store.load_into(model, source.version)
            except (WeightsError, OSError) as exc:
                raise ConfigError(INIT_FROM, str(exc)) from exc
            log.info("no checkpoint: initialised the model from version %d of %r in %s (%d examples "
                     "trained there); optimizer, replay buffer and metrics start fresh",
                     source.version, man.model_name, source.store.url, man.trained_examples)
    try:
        learner = ContinualLearner(model, learner_config_from(settings), catalog)
    except LearnerError as exc:
        raise ConfigError(f"{ENV_PREFIX}DEVICE", str(exc)) from exc
    learner.train_wrapper.ipw_clip = settings.ipw_clip  # IPW of the click loss (trainer.losses.ipw_weights)
    return learner
