"""Fine-tune the target model on the selected subset: DeepSpeed ZeRO on Ray Train.

With no arguments it runs the demo (configs/finetune_demo.yaml): a fresh "small" target trained
from scratch on runs/demo/selected.jsonl (written by jobs/select.py) into
runs/demo-target/model. Without --config, that demo config applies unless --model names a
pretrained model (then the library defaults, e.g. lr 2e-5, apply). Rerunning a killed run
resumes it from its last checkpoint.

    python jobs/finetune.py
    python jobs/finetune.py --data runs/demo --zero-stage 3 --epochs 2
    python jobs/finetune.py --model path/to/pythia-410m --data runs/mathinstruct --output runs/target-410m
    ray job submit --working-dir . -- python jobs/finetune.py --config configs/finetune_demo.yaml
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: repo root on sys.path, jobs/ off it)
import argparse
import os
import sys

from s2l_ray import cli, pipeline
from s2l_ray.config import FinetuneConfig, load_config, parse_sets

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "finetune_demo.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML file of FinetuneConfig fields (default without --model: {DEMO_CONFIG})")
    p.add_argument("--data", help="selection run dir (its selected.jsonl) or any corpus path")
    p.add_argument("--budget", type=int, help="pick selected-<BUDGET>.jsonl in a run dir with several")
    p.add_argument("--model", help="local Hugging Face model dir (default: a fresh 'small' preset)")
    p.add_argument("--output", help="output dir: model/, train/ checkpoints, finetune.json")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--micro-batch-size", type=int, help="rows per worker per forward pass")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints (0: end only)")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3))
    p.add_argument("--offload-optimizer", action="store_true", default=None, help="optimizer states in CPU memory")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--verbose", action="store_true", help="Ray's own output too (worker logs, progress bars, warnings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set text.max_length=1024 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the plan; read and run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    overrides = {"corpus.path": a.data, "budget": a.budget, "model": a.model, "output": a.output,
                 "epochs": a.epochs, "lr": a.lr, "micro_batch_size": a.micro_batch_size, "grad_accum": a.grad_accum,
                 "checkpoint_every": a.checkpoint_every, "zero_stage": a.zero_stage,
                 "offload_optimizer": a.offload_optimizer, "workers.count": a.num_workers}

    def body() -> None:
        from s2l_ray import finetune

        config = a.config if a.config is not None or a.model else DEMO_CONFIG
        cfg = load_config(config, {**overrides, **parse_sets(a.set)}, cls=FinetuneConfig)
        if a.dry_run:
            print(finetune.dry_run(cfg))
            return
        pipeline.ensure_ray()
        finetune.run(cfg)

    return cli.main(body, verbose=a.verbose)


if __name__ == "__main__":
    sys.exit(main())
