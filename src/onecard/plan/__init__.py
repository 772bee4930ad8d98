"""Predict memory and speed for a model x card x job, and propose the settings that fit (issue 9)."""

from onecard.plan.card_memory import CardMemory, live_card_memory
from onecard.plan.fit import InferencePlan, TrainingPlan, plan_inference, plan_training, resolve_card
from onecard.plan.spec import ModelSpec, resolve_model

__all__ = ["CardMemory", "InferencePlan", "ModelSpec", "TrainingPlan", "plan_inference", "plan_training", "live_card_memory", "resolve_card", "resolve_model"]
