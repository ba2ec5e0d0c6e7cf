"""`cvt tune`: time the CPU-dependent fast paths on and off here and keep, for this CPU model and torch version,
the ones that pay (`cvt.layers.calibrate`); `import cvt` applies the choice on a matching machine.

    cvt tune                                         # the demo's workload: cvt_tiny, 28 px, batch 128
    cvt tune --model cvt_13 --img-size 224 --batch-size 32
    cvt tune --show                                  # the setting in force and where it came from
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cvt_tiny", help="the model to time (default cvt_tiny)")
    parser.add_argument("--img-size", type=int, default=28, help="input side (default 28)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch (default 128)")
    parser.add_argument("--in-chans", type=int, default=1, help="input channels (default 1, Fashion-MNIST's)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating on/off pairs per measurement (default 5)")
    parser.add_argument("--show", action="store_true",
                        help="print the setting in force and its origin, measure nothing")


def run(args: argparse.Namespace) -> int:
    from ..layers import calibrate
    from ..layers.config import CPU_DEPENDENT, fast_path_config, fast_path_origin

    if args.show:
        print(f"{calibrate.machine_key()}: {fast_path_origin()}")
        for name, on in fast_path_config().items():
            print(f"  {name:<20} {'on' if on else 'off'}")
        return 0
    if args.rounds < 1 or args.batch_size < 1:
        raise ValueError("--rounds and --batch-size must be >= 1")
    print(f"timing {', '.join(CPU_DEPENDENT)} on and off: "
          f"{args.model}, batch {args.batch_size} x {args.img_size} px, {args.rounds} pairs each")
    speedups = calibrate.measure(args.model, args.img_size, args.batch_size, args.rounds, in_chans=args.in_chans)
    choice = calibrate.choose(speedups)
    for path, by in speedups.items():
        figures = ", ".join(f"{what} {x:.2f}x" for what, x in by.items())
        print(f"  {path:<15} {figures} -> {'on' if choice[path] else 'off'}")
    workload = {"model": args.model, "img_size": args.img_size, "batch": args.batch_size, "rounds": args.rounds}
    path = calibrate.save(choice, speedups, workload)
    print(f"kept for {calibrate.machine_key()} in {path}")
    return 0
