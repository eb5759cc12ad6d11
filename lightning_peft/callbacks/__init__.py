"""Lightning callbacks: the thin glue between strategies and the Trainer."""

from lightning_peft.callbacks.adversarial import AdversarialTraining
from lightning_peft.callbacks.curriculum import CurriculumSchedule, Phase
from lightning_peft.callbacks.distill import Distillation
from lightning_peft.callbacks.evaluation import Evaluation
from lightning_peft.callbacks.layerwise_lr import LayerwiseLR, layerwise_param_groups
from lightning_peft.callbacks.multitask import MultiTaskSchedule
from lightning_peft.callbacks.noise import NEFTune
from lightning_peft.callbacks.peft import PEFT
from lightning_peft.callbacks.regularization import AdapterRegularization

__all__ = [
    "PEFT",
    "AdapterRegularization",
    "AdversarialTraining",
    "CurriculumSchedule",
    "Distillation",
    "Evaluation",
    "LayerwiseLR",
    "MultiTaskSchedule",
    "NEFTune",
    "Phase",
    "layerwise_param_groups",
]
