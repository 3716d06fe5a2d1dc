"""Convert the released AIDC-AI/Wings checkpoint into a Wings model directory (compat="official")."""

from .mapping import OfficialLayout, infer_layout, map_key
from .official import convert_official, load_official_tensors
from .reader import read_safetensors_dir

__all__ = ["OfficialLayout", "convert_official", "infer_layout", "load_official_tensors", "map_key",
           "read_safetensors_dir"]
