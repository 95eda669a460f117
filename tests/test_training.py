"""The one training loop (``s2l_ray.training``) with its two engines: plain PyTorch (the proxy's) and DeepSpeed (the
target's) train the same rows to the same per-step losses and weights, with gradient accumulation and clipping."""
from __future__ import annotations

import json

import numpy as np
import pytest
import ray

from s2l_ray import batches
from s2l_ray.config import CorpusConfig, TextConfig
from s2l_ray.corpus import normalise, tokenize
from s2l_ray.models import load_tokenizer


def _part(ids: list[list[int]], spans: list[list[int]]) -> tuple:
    """One stored part as ``batches`` holds it in the object store: (token ids, offsets, spans, offsets)."""
    out = []
    for rows in (ids, spans):
        out += [np.asarray([v for r in rows for v in r], np.int64),
                np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)]
    return tuple(out)


@ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
def _train_both(data, tokenizer: str, micro: int, grad_accum: int, settings: list[tuple[bool, float]]) -> list[dict]:
    """Ray task (a fresh process, one gloo rank): per (packed, grad_clip), the same initial model trained by both
    engines: each one's per-step losses and final weights."""
    import os

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import get_scheduler

    from s2l_ray import training
    from s2l_ray.models import build_model, load_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    tok = load_tokenizer(tokenizer)
    _, _, spe = training.steps_per_epoch(data.n, 1, micro, grad_accum)
    total = 2 * spe

    def fresh():
        model = build_model("tiny", tok, seed=0, max_length=256).float().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # unlike AdamW, sensitive to gradient scale
        return model, opt, lambda o: get_scheduler("cosine", o, num_warmup_steps=1, num_training_steps=total)

    out = []
    for packed, grad_clip in settings:
        loop = training.Loop(epochs=2, steps_per_epoch=spe, micro_batch_size=micro, seed=3, pad_id=tok.pad_token_id,
                             grad_accum=grad_accum, packed=packed)
        model, opt, sched = fresh()
        engine = training.TorchEngine(model, opt, sched(opt), torch.device("cpu"), grad_accum, grad_clip, None)
        a: list[float] = []
        training.run(engine, data, loop, 0, 1, 0, lambda s: a.append(s.loss))
        wa = [p.detach().clone() for p in model.parameters()]
        model, opt, sched = fresh()
        ds, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config={
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro * grad_accum, "gradient_clipping": grad_clip, "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True})
        b: list[float] = []
        training.run(training.DeepSpeedEngine(ds), data, loop, 0, 1, 0, lambda s: b.append(s.loss))
        wb = [p.detach().clone() for p in ds.module.parameters()]
        out.append({"torch": a, "deepspeed": b, "steps": total,
                    "weights": max((x - y).abs().max().item() for x, y in zip(wa, wb))})
    dist.destroy_process_group()
    return out


def test_the_torch_and_deepspeed_engines_train_alike(ray_local, demo_small):
    """Two epochs of micro-batches of 4 rows, two per optimizer step, by SGD with momentum (whose steps scale with the
    gradients, so accumulation's averaging shows): padded and unclipped, and packed with gradients clipped at 0.5
    (clipping changes that run: it is below the tiny model's gradient norm). The plain PyTorch engine and DeepSpeed
    ZeRO-2 give the same per-step losses and final weights (fp32, 1e-5), as many steps as planned."""
    tok = load_tokenizer(demo_small["tokenizer"])
    rows = [normalise(json.loads(line), CorpusConfig()) for line in open(demo_small["train"])]
    enc = tokenize(tok, None, rows, TextConfig(max_length=128), [r["id"] for r in rows])
    keep = [i for i, n in enumerate(enc["n_response"]) if n > 0]
    data = batches.Data((ray.put(_part([enc["input_ids"][i] for i in keep], [enc["spans"][i] for i in keep])),),
                        (len(keep),))
    plain, clipped = ray.get(_train_both.remote(data, demo_small["tokenizer"], 4, 2, [(False, 0.0), (True, 0.5)]))
    for out in (plain, clipped):
        a, b = out["torch"], out["deepspeed"]
        assert len(a) == len(b) == out["steps"] == 2 * (-(-len(keep) // 4) // 2)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
        assert out["weights"] < 1e-5
        assert a[-1] < a[0]  # it trains
    assert plain["torch"][0] == pytest.approx(clipped["torch"][0], abs=1e-5)  # the same first step: packed = padded
    assert max(abs(x - y) for x, y in zip(plain["torch"], clipped["torch"])) > 1e-3  # then clipping shows
