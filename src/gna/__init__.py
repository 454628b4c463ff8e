"""gna: Generalized Neighborhood Attention (sliding-window, strided and blocked attention over
1-D, 2-D and 3-D token layouts) with NATTEN's API and semantics."""

from . import backends, geometry, sim, triton_backend
from .api import attention, merge_attentions, na1d, na2d, na3d, neighborhood_attention
from .geometry import Geometry
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__version__ = "0.1.0"

__all__ = [
    "attention", "merge_attentions", "na1d", "na2d", "na3d", "neighborhood_attention",
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
    "Geometry", "backends", "geometry", "sim",
]
