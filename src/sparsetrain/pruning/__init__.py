"""Pruning: saliency scores and masks at initialisation, and dense-to-sparse baselines."""

from .ablations import ABLATIONS, shuffle_masks
from .lottery import LotteryRound, LotteryTicket, run_lottery_ticket
from .prune import SCOPES, mask_density, prune_at_init
from .scores import PRUNING_METHODS, pruning_scores
from .small_dense import SmallDenseWidth, dense_param_count, small_dense_width, sparse_param_count

__all__ = [
    "ABLATIONS",
    "shuffle_masks",
    "LotteryRound", "LotteryTicket", "PRUNING_METHODS", "SCOPES", "SmallDenseWidth",
    "dense_param_count", "mask_density", "prune_at_init", "pruning_scores", "run_lottery_ticket",
    "small_dense_width", "sparse_param_count",
]
