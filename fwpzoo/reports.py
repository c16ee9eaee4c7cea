"""The markdown pages that benchmarks and experiments write: rewritten on every run, except for
the hand-written notes below NOTES_MARKER, which are kept."""

from pathlib import Path

NOTES_MARKER = "<!-- notes: kept when the report is rewritten -->"


def write_page(path: Path, body: str) -> None:
    """path with body, then NOTES_MARKER and whatever notes the old page had after it."""
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body.rstrip() + "\n\n" + NOTES_MARKER + (notes or "\n"))
