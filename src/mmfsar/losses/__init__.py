"""Loss functions: distillation terms (``distill``); reconstruction lives in ``reconstruction``."""

from mmfsar.losses.distill import (
    Contrastive,
    CrossEntropy,
    DistillBatch,
    DistillSpec,
    DistillTerm,
    LogitKD,
    Relation,
    TranslationMSE,
    info_nce,
    logit_kd,
    relation_loss,
    relation_matrix,
    translation_mse,
)

__all__ = [
    "Contrastive",
    "CrossEntropy",
    "DistillBatch",
    "DistillSpec",
    "DistillTerm",
    "LogitKD",
    "Relation",
    "TranslationMSE",
    "info_nce",
    "logit_kd",
    "relation_loss",
    "relation_matrix",
    "translation_mse",
]
