"""DualVar objectives: losses computed from embeddings (never the model), returning named parts."""
from .dualvar_loss import (FRAMEWORKS, MODES, DualVarLoss, DualVarLossConfig, DualVarLossOutput, MoCoDualVarLoss,
                           Queue)

__all__ = ["FRAMEWORKS", "MODES", "DualVarLoss", "DualVarLossConfig", "DualVarLossOutput", "MoCoDualVarLoss", "Queue"]
