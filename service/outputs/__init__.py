"""Output formats written from a VideoResult."""

from service.outputs.davis import davis_palette, write_davis
from service.outputs.mots import mots_lines, write_mots
from service.outputs.overlay import write_overlay
from service.outputs.write import FORMATS, write_outputs
from service.outputs.ytvis import write_ytvis, ytvis_entries

__all__ = ["FORMATS", "davis_palette", "mots_lines", "write_davis", "write_mots", "write_outputs", "write_overlay",
           "write_ytvis", "ytvis_entries"]
