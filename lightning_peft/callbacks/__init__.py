"""Lightning callbacks: the thin glue between strategies and the Trainer."""

from lightning_peft.callbacks.curriculum import CurriculumSchedule, Phase
from lightning_peft.callbacks.multitask import MultiTaskSchedule
from lightning_peft.callbacks.peft import PEFT

__all__ = ["PEFT", "CurriculumSchedule", "MultiTaskSchedule", "Phase"]
