"""Writes benchmarks/tiny-motion-distillation.json: a distilled tiny-motion student at its steps against the
teacher at the base steps (e.g. 32, guided) and at the student's steps, on held-out clips, from the same noise.

    python benchmarks/tiny_motion_distillation.py [STUDENT_FOLDER] [--clips 32] [--json PATH] [--stage1 FOLDER]
        [--before FOLDER] [--teacher-samplers A,B] [--split K]
    python benchmarks/tiny_motion_distillation.py --write-stills FOLDER [--stills N] [--first I]  # stills to distil on

STUDENT_FOLDER defaults to the student shipped with tiny-motion. Runs on the CPU in float32. The stills are the
first frames of N clips of animate_cli.clips' training stream (index 100000 + i, past what training used), from
still I on (--first, default 0; still i is written as s{i:03d}.png).
--stage1 WORKDIR/phase-0 (the same run's stage-1 student) adds "stages": how much of the student's distance
comes from folding guidance into one pass and how much from the step-reducing rounds. --before WORKDIR/phase-R
(R = the run's --rounds: the same run's student before stage 3) adds "before_match": what stage 3 changed.
With more than K clips (--split, default 32), "student_vs_teacher_steps_by_part" compares the student with the
teacher's steps on the first K clips and on the rest apart: recipes chosen on the first 32 are judged on the rest.
"""

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from animate_cli import __version__, quality
from animate_cli.models import load_model, packaged_model
from animate_cli.sampling import SAMPLERS
from animate_cli.student import attach_student

STILLS = 384  # how many stills the shipped student's stage 1 and round were distilled on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", nargs="?", default=str(packaged_model("tiny-motion") / "student"))
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--max-guidance", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--write-stills", type=Path, default=None, metavar="FOLDER")
    parser.add_argument("--stage1", default=None, metavar="FOLDER")
    parser.add_argument("--before", default=None, metavar="FOLDER")
    parser.add_argument("--stills", type=int, default=STILLS, metavar="N")
    parser.add_argument("--first", type=int, default=0, metavar="I",
                        help="with --write-stills: write the stills from still I of the stream on [0]")
    parser.add_argument("--split", type=int, default=32, metavar="K",
                        help="with more than K clips, also compare student and teacher's steps on the first K "
                             "clips and on the rest apart (student_vs_teacher_steps_by_part)")
    parser.add_argument("--teacher-samplers", default="", metavar="A,B",
                        help="also the teacher with these samplers (e.g. dpmpp_2m,heun) on the student's grid")
    args = parser.parse_args()
    if args.write_stills is not None:
        if args.first < 0 or args.stills < 1:
            parser.error("--first must be 0 or more and --stills 1 or more")
        write_stills(args.write_stills, args.stills, args.first)
        return
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    teacher = load_model("tiny-motion", torch.float32, cpu, progress=False)

    def with_student(folder):
        if folder is None:
            return None
        model = load_model("tiny-motion", torch.float32, cpu, progress=False)
        attach_student(model, folder, torch.float32, cpu)
        return model

    student, stage1, before = (with_student(f) for f in (args.student, args.stage1, args.before))
    for model, phase, flag in ((stage1, lambda d: 0, "--stage1"), (before, lambda d: d["rounds"], "--before")):
        made = (model.extras["student"].get("distillation") or {}) if model is not None else None
        if made and made.get("phase") != phase(made):
            parser.error(f"{flag}: that student is from phase {made.get('phase')} of its run, not {phase(made)}")
    samplers = tuple(x for x in args.teacher_samplers.split(",") if x)
    unknown = [x for x in samplers if x not in SAMPLERS]
    if unknown:
        parser.error(f"--teacher-samplers: no sampler {unknown[0]!r}; choose from {', '.join(SAMPLERS)}")
    start = time.perf_counter()
    report = quality.distillation_report(teacher, student, n=args.clips, max_guidance=args.max_guidance,
                                         stage1=stage1, before_match=before, teacher_samplers=samplers)
    meta = student.extras["student"]
    result = {
        "what": "a distilled tiny-motion student against its teacher, on held-out clips from the same noise",
        "command": "python benchmarks/tiny_motion_distillation.py " + " ".join(
            a for a in (args.student if args.student != str(packaged_model("tiny-motion") / "student") else "",
                        f"--clips {args.clips}", f"--stage1 {args.stage1}" if args.stage1 else "",
                        f"--before {args.before}" if args.before else "",
                        f"--teacher-samplers {','.join(samplers)}" if samplers else "",
                        f"--split {args.split}" if args.split != 32 else "") if a),
        "machine": f"CPU ({platform.machine()}, {args.threads} thread{'s' if args.threads != 1 else ''}), float32",
        "date": datetime.date.today().isoformat(),
        "animate": __version__, "torch": torch.__version__,
        "settings": {
            "teacher_base": f"teacher, Euler (DDIM) on the {report['steps']['teacher_base']}-step "
                            f"{meta['schedule']['name']} grid, guidance {report['min_guidance']} -> "
                            f"{report['max_guidance']} over the frames, two passes per step",
            "teacher_steps": f"teacher the same way on the student's {report['steps']['student']}-step grid "
                             f"(every {meta['schedule']['stride']}th point)",
            "student": f"student, Euler on that grid, guidance {report['max_guidance']} as its input, one pass "
                       "per step",
        },
        "distillation": meta.get("distillation"),
        **({"averaged_from": meta["averaged_from"]} if meta.get("averaged_from") else {}),  # average_students.py
        "student_guidance": meta.get("guidance"),
        **report,
        **({"student_vs_teacher_steps_by_part": quality.paired_parts(report["student_vs_teacher_steps"], args.split)}
           if 0 < args.split < args.clips else {}),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(result, indent=1)
    if args.json is not None:
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.json)
    print(text)


def write_stills(folder: Path, n: int, first: int = 0) -> None:
    from PIL import Image

    from animate_cli import clips

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        Image.fromarray(clips.make_clip(0, 0, 100000 + i).frames[0]).save(folder / f"s{i:03d}.png")
    print(f"{n} stills written to {folder}")


if __name__ == "__main__":
    main()
