"""miner3d: multiscale implicit neural representations (MINER) of very large volumes and images.

The data's journey, one module per stage::

    mesh --voxelize--> occupancy grid (grid.py) --> pyramid --> blocks --> MLP banks --> model

The coordinate convention every stage shares is documented in :mod:`miner3d.grid`.
"""

from .errors import MinerError
from .grid import GridTransform, OccupancyGrid

__version__ = "0.1.0"
__all__ = ["GridTransform", "MinerError", "OccupancyGrid", "__version__"]
