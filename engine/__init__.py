"""dualvar.engine: data, models, objectives, training and evaluation for DualVar pretraining."""
