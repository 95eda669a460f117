"""Import a GGUF model file (llama.cpp's format) as a plain Hugging Face model directory.

Weights are dequantized to fp32 safetensors; the tokenizer, its chat template and the generation
config are saved beside them. ``--layers N`` writes the model cut to its first N decoder layers
instead (a fast proxy with real pretrained weights). DIR must not exist yet.

    python jobs/import_model.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --output models/smollm2
    python jobs/import_model.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --output models/smollm2-2l --layers 2
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: repo root on sys.path, jobs/ off it)
import argparse
import os
import sys
import tempfile

from s2l_ray import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf model file")
    p.add_argument("--output", required=True, metavar="DIR", help="model directory to write (must not exist)")
    p.add_argument("--layers", type=int, metavar="N", help="keep only the first N decoder layers")
    a = p.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        p.error(f"--layers must be at least 1, not {a.layers}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def body() -> None:
        from s2l_ray.models import ModelError, check_new_dir, derive_proxy, import_gguf

        if a.layers is None:
            import_gguf(a.gguf, a.output)
        else:
            check_new_dir(a.output)  # before the import, not after
            parent = os.path.dirname(os.path.abspath(a.output))
            os.makedirs(parent, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".import-", dir=parent) as tmp:  # the full model, then cut
                full = import_gguf(a.gguf, os.path.join(tmp, "full"))
                try:
                    derive_proxy(full, a.output, a.layers)
                except ModelError as e:
                    raise ModelError(str(e).replace(full, a.gguf)) from None
        print(f"wrote {a.output}", flush=True)

    return cli.main(body)


if __name__ == "__main__":
    sys.exit(main())
