"""Fashion-MNIST's four IDX files: found on a local mirror or downloaded, validated, installed.

torchvision's `FashionMNIST` reads `<data_dir>/FashionMNIST/raw/`; this module fills that folder,
checking every file (magic, dimensions, counts, labels) before any is written, so a bad mirror or
a truncated download never lands there, and reads a split back with the same checks.
"""

from __future__ import annotations

import gzip
import logging
import tempfile
import zlib
from pathlib import Path

import filelock
import torch
from torchvision.datasets import FashionMNIST

from fmnist_tl.core import FmnistError, atomic_write_bytes, remove_stale_temp_files

log = logging.getLogger(__name__)

DEBIAN_MIRROR = Path("/usr/share/datasets/fashion-mnist")
# (file stem, kind, split) for the four IDX files torchvision's FashionMNIST reads from raw/.
IDX_FILES = (
    ("train-images-idx3-ubyte", "images", "train"),
    ("train-labels-idx1-ubyte", "labels", "train"),
    ("t10k-images-idx3-ubyte", "images", "test"),
    ("t10k-labels-idx1-ubyte", "labels", "test"),
)
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
DEFAULT_SIZES = {"train": 60000, "test": 10000}


def parse_idx(raw: bytes, name: str, kind: str, expected_count: int | None) -> torch.Tensor:
    """Check one decompressed IDX file and return its contents as a uint8 tensor.

    Checks use explicit raises (not `assert`) so they survive `python -O`.
    """

    def bad(why: str) -> FmnistError:
        return FmnistError(f"{name}: {why}; delete it (and fix the mirror) so it is fetched again")

    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad(f"file is {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise bad(f"wrong IDX magic 0x{magic:08x}, expected 0x{IDX_MAGIC[kind]:08x} for {kind}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and dims[1:] != [28, 28]:
        raise bad(f"images are {dims[1]}x{dims[2]}, expected 28x28")
    payload = len(raw) - header
    expected_payload = dims[0] * (784 if kind == "images" else 1)
    if payload != expected_payload:
        raise bad(f"header says {dims[0]} items ({expected_payload} bytes) but payload is {payload} bytes")
    if expected_count is not None and dims[0] != expected_count:
        raise bad(f"holds {dims[0]} {kind}, expected {expected_count}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)
    if kind == "labels" and data.numel() and int(data.max()) > 9:
        raise bad(f"label {int(data.max())} is out of range 0-9")
    return data


def read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        # gzip raises BadGzipFile (not gzip / CRC), EOFError (truncated) or zlib.error (corrupt).
        raise FmnistError(f"{path}: not a valid gzip file ({e or type(e).__name__}); replace it") from e


# The splits read in this process, by their files' stat: a sweep's trials run one after another in
# one process (Hydra's basic launcher) and would each read and check the same files again.
_READ: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def load_split(raw_dir: Path, split: str, expected_count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and validate one split's images and labels from torchvision's raw/ folder (copies of
    the ones this process read before when the files are unchanged)."""
    paths = {kind: raw_dir / stem for stem, kind, file_split in IDX_FILES if file_split == split}
    stats = []
    for path in paths.values():
        if not path.is_file():
            raise FmnistError(f"{path} is missing; call prepare_data() first (train does) or check data.data_dir")
        st = path.stat()
        stats.append((str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino))
    key = (split, expected_count, *stats)
    if key not in _READ:
        images, labels = (parse_idx(p.read_bytes(), str(p), kind, expected_count) for kind, p in paths.items())
        if len(images) != len(labels):
            raise FmnistError(
                f"{raw_dir}: {split} split has {len(images)} images but {len(labels)} labels; "
                "delete the raw folder so it is fetched again"
            )
        _READ.pop(next((k for k in _READ if k[0] == split), None), None)  # one entry per split
        _READ[key] = images, labels.long()
    images, labels = _READ[key]
    return images.clone(), labels.clone()


def prepare_raw(raw_dir: Path, mirror_dir: str | None, download: bool, expected_sizes: dict[str, int | None]) -> None:
    """Put validated IDX files in raw_dir: from the local mirror first, else torchvision's download."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    # Parallel jobs (joblib sweeps) share the data dir: one installs while the others wait, and
    # stale temp files are only removed while no other process can be writing one.
    with filelock.FileLock(str(raw_dir / ".prepare.lock")):
        remove_stale_temp_files(raw_dir)
        if not all((raw_dir / stem).is_file() for stem, _, _ in IDX_FILES):
            _install(raw_dir, _fetch(raw_dir, mirror_dir, download, expected_sizes), expected_sizes)


def _mirror(mirror_dir: str | None) -> Path | None:
    if mirror_dir is not None:
        path = Path(mirror_dir)
        if not path.is_dir():
            raise FmnistError(
                f"data.mirror_dir={path} does not exist; point it at the folder with the *-ubyte.gz files"
            )
        return path
    return DEBIAN_MIRROR if DEBIAN_MIRROR.is_dir() else None


def _fetch(
    raw_dir: Path, mirror_dir: str | None, download: bool, expected_sizes: dict[str, int | None]
) -> dict[str, tuple[str, bytes]]:
    """stem -> (where it came from, IDX bytes), from the mirror or a download into a temp dir."""
    mirror = _mirror(mirror_dir)
    if mirror is not None:
        files = {}
        for stem, _, _ in IDX_FILES:
            src = mirror / f"{stem}.gz"
            if src.is_file():
                files[stem] = (str(src), read_gz(src))
            elif (mirror / stem).is_file():
                files[stem] = (str(mirror / stem), (mirror / stem).read_bytes())
            else:
                raise FmnistError(f"{src}: missing from the data mirror; add it or set data.mirror_dir")
        log.info("Fashion-MNIST copied from mirror %s to %s", mirror, raw_dir)
        return files
    if not download:
        raise FmnistError(
            f"Fashion-MNIST not found in {raw_dir} and no mirror; install Debian's "
            "dataset-fashion-mnist, set data.mirror_dir, or allow data.download=true"
        )
    # Download into a temp dir beside raw/ so a failed or partial download never lands in raw/.
    with tempfile.TemporaryDirectory(dir=raw_dir.parent.parent, prefix=".download-") as tmp:
        try:
            for train in (True, False):
                FashionMNIST(tmp, train=train, download=True)
        except Exception as e:  # network errors come in many types (URLError, HTTPError, socket, ...)
            raise FmnistError(
                f"could not download Fashion-MNIST ({e}); install Debian's dataset-fashion-mnist "
                "or set data.mirror_dir to a folder with the *-ubyte.gz files"
            ) from e
        downloaded = Path(tmp) / "FashionMNIST" / "raw"
        return {stem: (str(downloaded / stem), (downloaded / stem).read_bytes()) for stem, _, _ in IDX_FILES}


def _install(raw_dir: Path, files: dict[str, tuple[str, bytes]], expected_sizes: dict[str, int | None]) -> None:
    """Validate all four files, and each split's images against its labels, before writing any."""
    counts = {}
    for stem, kind, split in IDX_FILES:
        source, raw = files[stem]
        counts[split, kind] = source, len(parse_idx(raw, source, kind, expected_sizes.get(split)))
    for split in ("train", "test"):
        (images_src, n_images), (labels_src, n_labels) = counts[split, "images"], counts[split, "labels"]
        if n_images != n_labels:
            raise FmnistError(f"{labels_src}: {n_labels} labels for {n_images} images in {images_src}; replace both")
    for stem, (_, raw) in files.items():
        atomic_write_bytes(raw_dir / stem, raw)
