from .attention_skyreels_v4 import SkyReelsV4Attention, SkyReelsV4AttnProcessor
from .block_skyreels_v4 import SkyReelsV4TransformerBlock
from .branch_skyreels_v4 import SkyReelsV4BranchModel, SkyReelsV4TransformerOutput
from .presets import PRESET_NAMES, preset_config
from .transformer_skyreels_v4 import SkyReelsV4Transformer
from .transformer_skyreels_v4_audio import SkyReelsV4AudioTransformer
from .transformer_skyreels_v4_refiner import SkyReelsV4RefinerTransformer

__all__ = [
    "PRESET_NAMES",
    "SkyReelsV4Attention",
    "SkyReelsV4AttnProcessor",
    "SkyReelsV4AudioTransformer",
    "SkyReelsV4BranchModel",
    "SkyReelsV4RefinerTransformer",
    "SkyReelsV4Transformer",
    "SkyReelsV4TransformerBlock",
    "SkyReelsV4TransformerOutput",
    "preset_config",
]
