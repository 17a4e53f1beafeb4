"""Copy a trained model folder (bildexp train/align `final/`) into the repository as a testbed model.

Weights are stored as safetensors in the chosen dtype (bf16 halves the size; `bildexp run` loads them
back in the pair's dtype, fp32 by default), with the tokenizer and a manifest.json that keeps the
training manifest (command, data, seed, time) and adds the stored dtype and the sha256 of the weights.

    python scripts/export_model.py checkpoints/t5_multi30k_large/final testbeds/t5_multi30k/large --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bildexp import file_sha256
from bildexp.models import DTYPES, load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a trained model folder with manifest.json")
    ap.add_argument("dst", type=Path, help="the testbed folder to (re)write")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--note", default="", help="free text kept in the manifest (e.g. how a run was resumed)")
    ap.add_argument("--time-s", type=float, help="total training seconds, for runs whose manifest predates `time_s`")
    args = ap.parse_args()
    manifest = json.loads((args.src / "manifest.json").read_text())
    model = load_model(str(args.src), DTYPES[args.dtype], torch.device("cpu"))
    tmp = args.dst.with_name(args.dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(str(args.src)).save_pretrained(tmp)
    manifest.update(
        stored_dtype=args.dtype,
        sha256=file_sha256(tmp / "model.safetensors"),
        trained_weights_sha256=manifest.get("sha256"),
        exported_from=str(args.src),
    )
    manifest.setdefault("time_s", manifest.get("time_s_this_run"))  # one uninterrupted run
    if args.time_s is not None:
        manifest["time_s"] = args.time_s
    if args.note:
        manifest["note"] = args.note
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(args.dst, ignore_errors=True)
    os.replace(tmp, args.dst)
    size = (args.dst / "model.safetensors").stat().st_size / 2**20
    print(f"{args.dst}: {size:.1f} MiB {args.dtype}, sha256 {manifest['sha256'][:16]}…")


if __name__ == "__main__":
    main()
