"""Released fast weight programmers in and out: Hugging Face folders of gated-DeltaNet hybrids
(qwen3_5, olmo_hybrid) converted exactly to fwpzoo workdirs and back (docs/interop.md)."""

from fwpzoo.interop.convert import export_folder, import_folder
from fwpzoo.interop.safetensors import InteropError

__all__ = ["InteropError", "export_folder", "import_folder"]
