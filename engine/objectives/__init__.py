"""DualVar objectives: losses computed from a framework's Embeddings record (never the model), returning
named parts. `build_objective(config)` gives the framework's objective: forward(emb), update(emb)."""
from .dualvar_loss import (FRAMEWORKS, MODES, DualVarLoss, DualVarLossConfig, DualVarLossOutput, MoCoDualVarLoss,
                           Queue, build_objective)

__all__ = ["FRAMEWORKS", "MODES", "DualVarLoss", "DualVarLossConfig", "DualVarLossOutput", "MoCoDualVarLoss", "Queue",
           "build_objective"]
