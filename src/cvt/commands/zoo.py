"""`cvt zoo`: the registered models, their parameter counts and MACs."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--img-size", type=int, default=None, help="count MACs at this size (default: each model's own)"
    )


def zoo_rows(img_size: int | None = None) -> list[dict]:
    from ..flops import count_macs
    from ..model import CvT, param_count
    from ..registry import get_variant, list_models

    rows = []
    for name in list_models():
        variant = get_variant(name)
        size = img_size or variant.input_size
        model = CvT(variant.config)
        rows.append(
            dict(
                model=name,
                params=param_count(model),
                input=size,
                gmacs=count_macs(model, size) / 1e9,
                paper=variant.from_paper,
                description=variant.description,
            )
        )
    return rows


def run(args: argparse.Namespace) -> int:
    rows = zoo_rows(args.img_size)
    print(f"{'model':<10} {'params':>13} {'input':>6} {'GMACs':>8}  description")
    for r in rows:
        print(f"{r['model']:<10} {r['params']:>13,} {r['input']:>6} {r['gmacs']:>8.3f}  {r['description']}")
    return 0
