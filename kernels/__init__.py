"""dualvar.kernels: fused ops with autograd, each behind one backend dispatcher.

Public ops (every backend computes the same function; see `last_backend` for which one ran):
    permute_frames      uint8 clips + frame index maps -> normalised (B, C, T', H, W)
    nt_xent_loss        SimCLR NT-Xent, rows x columns never materialised   (op name "contrastive")
    info_nce_loss       MoCo InfoNCE with an optional queue                  (op name "contrastive")
    shuffle_rank_loss   DualVar's shuffle-rank loss
Each op `<op>` lives in kernels/<op>.py (reference, input checks, torch backend, compiled launchers,
autograd function, public function) and kernels/<op>_triton.py (Triton kernels and launchers).
Distributed helpers (rank, world size, gradient-exact row gathers) are in kernels/distributed.py.
"""
from ._dispatch import BACKENDS, BackendUnavailable, available_backends, last_backend
from ._ext import build_info
from .contrastive import info_nce_loss, info_nce_loss_reference, masked_lse, nt_xent_loss, nt_xent_loss_reference
from .distributed import all_gather_no_grad, gather_rows
from .permute_frames import (identity_index, normalization_lut, permute_frames, permute_frames_reference,
                             random_segment_permutation, segment_shuffle_index, time_reverse_index)
from .shuffle_rank import shuffle_rank_loss, shuffle_rank_loss_reference

__all__ = [
    "BACKENDS", "BackendUnavailable", "available_backends", "last_backend", "build_info",
    "permute_frames", "permute_frames_reference", "identity_index", "time_reverse_index",
    "random_segment_permutation", "segment_shuffle_index", "normalization_lut",
    "nt_xent_loss", "nt_xent_loss_reference", "info_nce_loss", "info_nce_loss_reference", "masked_lse",
    "gather_rows", "all_gather_no_grad", "shuffle_rank_loss", "shuffle_rank_loss_reference",
]
