"""Compare, measure and recommend: which quantization for this model on this machine."""

from lowbit.compare.configs import DEFAULT_MENU, FULL_MENU, Config, parse_config, parse_menu
from lowbit.compare.recommend import Limits, recommend
from lowbit.compare.run import Measure, Options, compare

__all__ = ["DEFAULT_MENU", "FULL_MENU", "Config", "Limits", "Measure", "Options", "compare", "parse_config",
           "parse_menu", "recommend"]
