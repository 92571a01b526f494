"""What data parallelism costs and gives on this machine: 2 gloo processes against one.

1. The communication share of a training step. Under torchrun, each of 2 processes trains on its
   half of a global batch of 256 (MNIST, dynamic binarization); rounds interleave steps whose
   gradients are all-reduced (DistributedDataParallel, summed) with steps taken under ``no_sync()``
   (the same work, no all-reduce). The share is 1 - t(no_sync) / t(all-reduce), for the default
   model (one hidden layer of 400) and for one 10x wider (4000).
2. IWAE-K on the MNIST test set (K=5000 and all 10,000 images by default) in one process and in 2
   processes that share the images out; the two figures must agree (the draws belong to the images).

On a machine with 2 cores, 2 processes share the cores one process uses with 2 threads, so no
speed-up is expected: the share is what we learn. Multi-GPU scaling has not been measured.

    PYROVAE_DATA=../shared/data python experiments/benchmarks/benchmark_distributed.py
    python experiments/benchmarks/benchmark_distributed.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pyrovae.config import Config
from pyrovae.data import binarize, prepare_test
from pyrovae.distributed import exit_now, launched, shard, start, stop, wrap
from pyrovae.engine import make_optimizer, train_step
from pyrovae.evaluate import importance_log_likelihood
from pyrovae.experiment import add_output_flags, command, output_folders
from pyrovae.build import build_vae
from pyrovae.objectives import build_objective
from pyrovae.atomic import write_json
from pyrovae.provenance import provenance

OUT = "results/benchmark_distributed"
WIDTHS = {"default (400)": 400, "10x wider (4000)": 4000}


def communication_share(world, device, steps: int, rounds: int, batch: int) -> dict:
    """Median step time with and without the gradient all-reduce, per model width."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch * 4, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    result = {}
    for name, width in WIDTHS.items():
        torch.manual_seed(0)
        config = Config().replace(model={"hidden": (width,)})
        vae = build_vae(config.model)
        loss_fn = wrap(build_objective(config.train.objective, vae, implementation=config.train.implementation), world, device)
        optimizer = make_optimizer(vae.parameters(), 1e-3, device)
        mine = [binarize(images[i:i + batch][shard(batch, world)], g) for i in range(0, len(images), batch)]
        times = {"all_reduce": [], "no_sync": []}
        for _ in range(rounds):
            for how in times:
                world.barrier()
                begin = time.perf_counter()
                for step in range(steps):
                    x = mine[step % len(mine)]
                    if how == "no_sync":
                        with loss_fn.no_sync():
                            train_step(loss_fn, optimizer, x)
                    else:
                        train_step(loss_fn, optimizer, x)
                world.barrier()
                times[how].append((time.perf_counter() - begin) / steps)
        sync, local = statistics.median(times["all_reduce"]), statistics.median(times["no_sync"])
        result[name] = {"step_ms_all_reduce": 1e3 * sync, "step_ms_no_sync": 1e3 * local,
                        "communication_share": 1 - local / sync,
                        "parameters": sum(p.numel() for p in vae.parameters())}
    return result


def iwae(world, particles: int, images: int | None) -> dict:
    torch.manual_seed(0)
    config = Config()
    vae = build_vae(config.model).eval()
    test, _ = prepare_test(config, torch.device("cpu"))
    test = test[:images] if images else test
    world.barrier()
    begin = time.perf_counter()
    figure = importance_log_likelihood(vae, test, k=particles, world=world)
    return {"seconds": time.perf_counter() - begin, "neg_log_likelihood": figure["neg_log_likelihood"],
            "images": test.shape[0], "particles": particles}


def worker(args) -> None:
    """One of the processes torchrun starts: both measurements, rank 0 writes them to --part."""
    world, device = start(torch.device("cpu"))
    try:
        share = communication_share(world, device, args.steps, args.rounds, 256)
        distributed = iwae(world, args.particles, args.images)
        if world.main:
            Path(args.part).write_text(json.dumps({"communication": share, "iwae": distributed,
                                                   "threads_per_process": torch.get_num_threads()}))
    finally:
        stop()
    exit_now(0)  # no interpreter shutdown for gloo's threads to meet (pyrovae.distributed.exit_now)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=5000, help="K of the IWAE estimate")
    parser.add_argument("--images", type=int, default=None, help="test images for IWAE (default: all)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each kind")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # set for the processes torchrun starts
    add_output_flags(parser, out=OUT, smoke="seconds-long run: 2 steps, 1 round, IWAE-5 on 200 images")
    args = parser.parse_args(argv)
    if args.smoke:
        args.particles, args.images, args.steps, args.rounds = 5, 200, 2, 1
    if launched():
        return worker(args)

    with output_folders(args.smoke, args.out, default_out=OUT) as folders:
        folders.out.mkdir(parents=True, exist_ok=True)
        part = folders.out / "two_processes.json"
        flags = ["--particles", str(args.particles), "--steps", str(args.steps), "--rounds", str(args.rounds),
                 *(["--images", str(args.images)] if args.images else [])]
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, *flags, "--part", str(part)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"2 processes: {time.perf_counter() - begin:.1f} s in all", flush=True)
        two = json.loads(part.read_text())
        part.unlink()
        from pyrovae.distributed import World

        one = iwae(World(), args.particles, args.images)
        gap = abs(one["neg_log_likelihood"] - two["iwae"]["neg_log_likelihood"])
        if gap > 1e-6 * abs(one["neg_log_likelihood"]):
            raise SystemExit(f"distributed IWAE differs from one process by {gap} nats")
        for name, row in two["communication"].items():
            print(f"{name:18s} step {row['step_ms_all_reduce']:7.2f} ms with all-reduce, "
                  f"{row['step_ms_no_sync']:7.2f} ms without: communication share {100 * row['communication_share']:.1f}%")
        print(f"IWAE-{args.particles} on {one['images']} images: one process ({torch.get_num_threads()} threads) "
              f"{one['seconds']:.1f} s, 2 processes (1 thread each) {two['iwae']['seconds']:.1f} s "
              f"= {two['iwae']['seconds'] / one['seconds']:.2f}x; -log p(x) {one['neg_log_likelihood']:.3f} both")
        write_json(folders.out / "results.json", {
            "communication": two["communication"], "iwae": {"one_process": one, "two_processes": two["iwae"],
                                                             "ratio_two_to_one": two["iwae"]["seconds"] / one["seconds"]},
            "threads": {"one_process": torch.get_num_threads(), "per_process": two["threads_per_process"]},
            **provenance("cpu"), "command": command(__file__, argv)})


if __name__ == "__main__":
    main()
