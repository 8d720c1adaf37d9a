"""Download PASCAL VOC 2012 and SBD, verify their MD5 checksums, and extract them.

    python scripts/download_voc.py --out /data            # VOC 2012 trainval + SBD
    python scripts/download_voc.py --out /data --no-sbd   # VOC only (no train_aug)

Leaves ``<out>/VOCdevkit/VOC2012`` (``dataset.root``) and ``<out>/benchmark_RELEASE``, then
prints the ``scripts/prepare_voc_aug.py`` command that builds ``split=train_aug``. An
archive already in ``<out>`` (e.g. copied there by hand on a machine without internet)
is verified and used instead of downloading.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

ARCHIVES = {
    "voc": {
        "file": "VOCtrainval_11-May-2012.tar",
        "urls": ["http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"],
        "md5": "6cd6e144f989b92b3379bac3b3de84fd",
        "extracts_to": "VOCdevkit/VOC2012",
    },
    "sbd": {
        "file": "benchmark.tgz",
        "urls": [
            "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
            "semantic_contours/benchmark.tgz",
            "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
            "semantic_contours/benchmark.tgz",
        ],
        "md5": "82b4d87ceb2ed10f6038a1cba92111cb",
        "extracts_to": "benchmark_RELEASE",
    },
}


class DownloadError(RuntimeError):
    pass


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(urls: list[str], dest: Path) -> None:
    """Fetch the first reachable URL into ``dest`` (via a .part file)."""
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while block := response.read(1 << 20):
                    out.write(block)
                    done += len(block)
                    if total:
                        print(f"\r{dest.name}: {done / total:6.1%} of {total / 2**30:.2f} GiB",
                              end="", file=sys.stderr)
            print(file=sys.stderr)
            part.replace(dest)
            return
        except (urllib.error.URLError, OSError) as err:
            errors.append(f"{url}: {err}")
    raise DownloadError(
        f"cannot download {dest.name}:\n  " + "\n  ".join(errors) + f"\nWithout internet, copy "
        f"{dest.name} into {dest.parent} by hand (from {urls[0]}) and run this script again: "
        f"it verifies and extracts archives that are already there.")


def fetch(key: str, out: Path) -> Path:
    spec = ARCHIVES[key]
    archive = out / spec["file"]
    if not archive.is_file():
        download(spec["urls"], archive)
    actual = md5sum(archive)
    if actual != spec["md5"]:
        raise DownloadError(f"{archive}: MD5 {actual} does not match the expected "
                            f"{spec['md5']}; delete the file and run again")
    target = out / spec["extracts_to"]
    if not target.is_dir():
        print(f"extracting {archive} ...", file=sys.stderr)
        with tarfile.open(archive) as tar:
            safe_extract(tar, out)
    if not target.is_dir():
        raise DownloadError(f"{archive} did not contain {spec['extracts_to']}")
    return target


def safe_extract(tar: tarfile.TarFile, out: Path) -> None:
    """Extract refusing paths that leave ``out`` (tarfile's "data" filter where available)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(out, filter="data")
        return
    root = out.resolve()
    for member in tar.getmembers():
        if not (root / member.name).resolve().is_relative_to(root) or member.issym() \
                or member.islnk():
            raise DownloadError(f"refusing to extract {member.name!r} from {tar.name}")
    tar.extractall(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for archives and data")
    parser.add_argument("--no-sbd", action="store_true", help="skip SBD (no train_aug)")
    parser.add_argument("--remove-archives", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        voc = fetch("voc", args.out)
        sbd = None if args.no_sbd else fetch("sbd", args.out)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.remove_archives:
        for key in ("voc",) + (() if args.no_sbd else ("sbd",)):
            (args.out / ARCHIVES[key]["file"]).unlink(missing_ok=True)
    print(f"VOC 2012: dataset.root={voc}")
    if sbd is not None:
        print(f"SBD: {sbd}\nnext, for dataset.split=train_aug:\n"
              f"  python scripts/prepare_voc_aug.py --voc {voc} --sbd {sbd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
