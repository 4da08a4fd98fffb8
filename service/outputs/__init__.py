"""Output formats written from a VideoResult."""

from service.outputs.davis import davis_palette, write_davis
from service.outputs.mots import mots_lines, write_mots
from service.outputs.overlay import write_overlay
from service.outputs.write import (
           FORMATS,
           MANIFEST,
           NAMES,
           OutputExists,
           check_output_dir,
           publish_output,
           write_outputs,
)
from service.outputs.ytvis import rle_box, rle_to_json, track_boxes, write_ytvis, ytvis_entries

__all__ = ["FORMATS", "MANIFEST", "NAMES", "OutputExists", "check_output_dir", "davis_palette", "mots_lines",
           "publish_output", "rle_box", "rle_to_json", "track_boxes", "write_davis", "write_mots", "write_outputs",
           "write_overlay", "write_ytvis", "ytvis_entries"]
