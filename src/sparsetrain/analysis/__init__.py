"""Tools to look inside sparse training, as the RigL and GraSP papers do.

- ``loss_along_line``: the loss on straight lines between two solutions, or between a
  solution and its initialisation (RigL paper, section 5).
- ``mask_overlap``: the Jaccard overlap of two sets of masks, per layer and overall.
- ``gradient_norms``: the norm of each layer's gradient on some batches (GraSP's motivation;
  Evci et al., "Gradient Flow in Sparse Neural Networks").
"""

from .gradients import gradient_norms
from .interpolation import LinePoint, interpolate_states, loss_along_line
from .overlap import MaskOverlap, mask_overlap, position_overlap

__all__ = ["LinePoint", "MaskOverlap", "gradient_norms", "interpolate_states",
           "loss_along_line", "mask_overlap", "position_overlap"]
