"""Averages students of one teacher weight by weight (a uniform "model soup", Wortsman et al. 2022) into a new
student folder that the `distilled` preset and tiny_motion_distillation.py read like any other.

    python benchmarks/average_students.py STUDENT_A STUDENT_B [...] --out FOLDER

Each STUDENT is a folder `animate distill` wrote (WORKDIR/phase-N/ or its --out). Every weight is averaged in
float32 and stored in the first student's dtype, with its file's metadata; student.json is the first student's,
with "averaged_from" naming the folders. The students must hold the same weights (names and shapes) and take the
same guidance input. OUT is written under a temporary name and renamed when complete; an existing OUT is not
overwritten.
"""

import argparse
import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from animate_cli.errors import AnimateError
from animate_cli.student import GUIDANCE_FILE, read_student_config, write_student_config

WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", GUIDANCE_FILE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(args.students) < 2:
        parser.error("give two students or more to average")
    if args.out.exists():
        parser.error(f"--out {args.out} exists; give a new folder")
    metas = []
    for folder in args.students:
        try:
            metas.append(read_student_config(folder))
        except AnimateError as e:
            parser.error(str(e))
        missing = [f for f in (*WEIGHTS, "unet/config.json") if not (folder / f).is_file()]
        if missing:
            parser.error(f"{folder}: {missing[0]} is missing; give folders that animate distill wrote")
    if len({json.dumps(m["guidance_embedding"], sort_keys=True) for m in metas}) > 1:
        parser.error("the students' guidance embeddings differ (student.json: guidance_embedding)")
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.students[0], tmp)
    for name in WEIGHTS:
        weights = [load_file(str(f / name)) for f in args.students]
        first = weights[0]
        for folder, w in zip(args.students[1:], weights[1:], strict=True):
            if w.keys() != first.keys() or any(w[k].shape != first[k].shape for k in first):
                shutil.rmtree(tmp)
                parser.error(f"{folder / name}: not the same weights as {args.students[0] / name}")
        with safe_open(str(args.students[0] / name), "pt") as f:
            metadata = f.metadata()  # (diffusers writes {"format": "pt"}; kept as the first student has it)
        save_file({k: (sum(w[k].float() for w in weights) / len(weights)).to(first[k].dtype) for k in first},
                  str(tmp / name), metadata=metadata)
    meta = dict(metas[0], averaged_from=[str(f) for f in args.students])
    write_student_config(tmp, meta)
    tmp.rename(args.out)
    print(f"{len(args.students)} students averaged into {args.out}")


if __name__ == "__main__":
    main()
