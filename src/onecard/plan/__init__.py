"""Predict memory and speed for a model x card x job, and propose the settings that fit (issue 9)."""

from onecard.plan.fit import InferencePlan, TrainingPlan, plan_inference, plan_training, resolve_card
from onecard.plan.spec import ModelSpec, resolve_model

__all__ = ["InferencePlan", "ModelSpec", "TrainingPlan", "plan_inference", "plan_training", "resolve_card", "resolve_model"]
