"""``psm data prepare SOURCE --from PATH --out DIR`` and ``psm data info DIR``.

``prepare`` converts an image source the user already has (nothing is downloaded) into a
prepared directory: ``train.npy`` / ``test.npy`` (uint8 ``[N, C, H, W]``), ``train_mean.npy``
and ``meta.json`` (see :mod:`psm.data.prepare`). An existing non-empty ``--out`` is refused;
the directory appears only when complete.

``info`` prints a prepared directory's ``meta.json`` (``--json``: verbatim).
"""

from __future__ import annotations

import argparse
import json
import sys

SOURCES = (  # the same as psm.data.sources.SOURCES, without importing numpy and Pillow here
    "digits",
    "mnist",
    "cifar10",
    "celeba64",
    "imagenet64",
    "folder",
)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="prepare image datasets (psm data prepare | info)",
        description="Convert image sources you already have into memory-mappable arrays.",
    )
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser(
        "prepare",
        help="convert a source once into DIR/{train,test}.npy, train_mean.npy, meta.json",
        description="Convert an image source into a prepared directory. Sources: digits "
        "(bundled with scikit-learn, no --from), mnist (the four idx files), cifar10 "
        "(cifar-10-batches-bin/ or -py/), celeba64 (img_align_celeba/ + "
        "list_eval_partition.txt), imagenet64 (train_data_batch_1..10.npz + val_data.npz, or "
        "train_64x64/ + valid_64x64/), folder (any PNG/JPEG folder).",
    )
    prep.add_argument("source", choices=SOURCES, help="which source")
    prep.add_argument("--from", dest="path", metavar="PATH", help="folder holding the source files")
    prep.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory")
    prep.add_argument(
        "--size",
        type=int,
        help="folder: resize shorter side to N, centre-crop NxN "
        "(default: keep the size; mixed sizes are refused)",
    )
    prep.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        help="folder: 1 grey, 3 RGB (default: as the first image)",
    )
    prep.add_argument(
        "--test-fraction", type=float, help="folder: share held out for testing (default 0.1)"
    )
    prep.add_argument("--seed", type=int, help="folder: seed of the split (default 0)")
    prep.add_argument("--workers", type=int, help="threads decoding images (default: up to 8)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_prepare)
    info = dsub.add_parser("info", help="print a prepared directory's meta.json")
    info.add_argument("dir", help="prepared directory")
    info.add_argument("--json", action="store_true", help="print meta.json verbatim")
    info.set_defaults(func=cmd_info)


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare

    meta = prepare(
        args.source,
        args.path,
        args.out,
        size=args.size,
        channels=args.channels,
        test_fraction=args.test_fraction,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"{_summary(meta)}; split: {meta['split']['rule']}", file=sys.stderr)
    print(args.out)
    return 0


def _summary(meta: dict) -> str:
    shape = "x".join(map(str, meta["shape"]))
    return (
        f"{meta['name']}: {meta['n_train']} train + {meta['n_test']} test images, "
        f"{shape}, {meta['levels']} levels"
    )


def cmd_info(args: argparse.Namespace) -> int:
    from ..data.prepare import read_meta

    meta = read_meta(args.dir)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    prov = meta.get("provenance", {})
    print(_summary(meta))
    print(f"split: {meta['split'].get('rule')} (seed {meta['split'].get('seed')})")
    print(f"from: {prov.get('kind')} at {prov.get('path') or '(bundled)'}")
    for f in prov.get("files", []):
        print(f"  {f['path']}  {f['bytes']} bytes")
    for f in prov.get("folders", []):
        print(f"  {f['path']}/  {f['images']} images, {f['bytes']} bytes")
    if prov.get("options"):
        print(f"options: {json.dumps(prov['options'])}")
    print(f"made by psm {prov.get('psm_version')} at {prov.get('created')}")
    return 0
