"""SkyReels V4 pipelines and the pieces they share."""

from .skyreels_v4 import *  # noqa: F401,F403
from .skyreels_v4 import __all__
