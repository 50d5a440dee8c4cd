"""Training entry points: ``Trainer`` (a detectron2 ``DefaultTrainer``), ``setup``, ``main``."""
from .train_loop import adapt_to_hardware, default_argument_parser, launch, main, run, setup
from .trainer import Trainer, build_evaluators, evaluator_types

__all__ = ["Trainer", "build_evaluators", "evaluator_types", "adapt_to_hardware",
           "default_argument_parser", "launch", "main", "run", "setup"]
