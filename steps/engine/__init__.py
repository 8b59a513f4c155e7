"""The one training engine: Ray Train TorchTrainer + DeepSpeed ZeRO-3.

Pretraining, SFT, rejection-sampling fine-tuning, reward models and PPO's learner differ
only in their `Objective` (module, batch building, loss); `train()` does the rest.
"""

from steps.engine.launch import TrainResult, run_on_worker, train
from steps.engine.objective import Objective, collate_lm, lm_objective_loss

__all__ = ["Objective", "TrainResult", "train", "run_on_worker", "collate_lm", "lm_objective_loss"]
