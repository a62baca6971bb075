"""The training configuration: the options (``options``), their rules (``rules``), and
where they come from (``sources``: flags and TOML)."""
from .options import CHOICES, Config
from .sources import add_arguments, flag, from_sources

__all__ = ["Config", "CHOICES", "add_arguments", "from_sources", "flag"]
