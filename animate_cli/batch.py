"""Batch mode: `animate INPUT... -o OUTDIR` over images, folders and globs; resumable, one bad image never
stops the run.

Inputs. Each INPUT is an image (read whatever its suffix), a folder (scanned for IMAGE_SUFFIXES, hidden
names skipped, symlinked folders not followed; --recursive descends) or a glob (`**` with --recursive).
Every input gets a relative path `rel`: below the folder it was found in, below the glob's literal
prefix, or its bare file name when named directly. `rel` decides the output's place and the seed.

Outputs. OUTDIR / rel's folder / rel's stem + the format's suffix (png: a folder of frames, no suffix).
Names are compared case-insensitively; when several inputs (or an input, or the manifest) would claim
one name, each of those inputs climbs one rung: the input's full name (`photo.jpg.mp4`), then that plus
10 hex digits of sha256 of its absolute path (`photo.jpg.0123456789.mp4`), then the full digest. The
result depends on the set of inputs only, never on their order. Outputs are written under a hidden
temporary name and renamed when complete (media.temporary_path), so an existing output is complete:
it is skipped unless --overwrite. Leftover temporary names in OUTDIR from a killed run are removed.

Seeds. With --seed S, an input's seed is sha256("S:rel") read big-endian, mod 2**31: the same image
gets the same video whatever the listing order, batch or resume. Without --seed, one random seed is
drawn per image. The manifest records the seed used.

Manifest. OUTDIR/animate-manifest.jsonl, one JSON object per line, appended (and fsynced) as the run
goes; a torn last line from a crash is closed with a newline before appending and skipped by
read_manifest. The manifest is locked while a run writes to OUTDIR: two runs never share one.

Writing. Videos are encoded on one background thread (Writer) while the next group is generated; their
manifest lines are written by the main thread once they are written, before the next group's writes start
and at the end of the run, so lines follow the order in which images finish, not the input order. A run
killed outright (SIGKILL) in that gap leaves a complete video without a line; a later run skips it as
existing.

Interrupts. The first SIGINT or SIGTERM abandons the image being denoised (at the next step) or lets
the one being decoded or written finish, then the run ends with 128 + the signal number (130 for
Ctrl-C); a second one stops at once. Either way no temporary file is left and an abandoned image gets
no manifest line.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import torch
from PIL import Image

from animate_cli.console import out
from animate_cli.errors import AnimateError
from animate_cli.media import IMAGE_SUFFIXES, fit_image, load_image, resolve_size, write_video
from animate_cli.preset import Preset

MANIFEST_NAME = "animate-manifest.jsonl"
# media.temporary_path: ".NAME.XXXXXXXX.partial[.fmt]"; report.write_json: ".NAME.partial"
TEMPORARY = re.compile(r"^\..+\.partial(\.(mp4|gif|webp))?$")
OOM_KNOBS = "--decode-chunk, --frames, --size or --batch-size"
STATUSES = ("done", "skipped", "failed")


@dataclass
class Job:
    source: Path  # the input file, only ever read
    rel: PurePosixPath  # place below its folder or glob base: output folder and seed come from it
    output: Path | None = None


@dataclass
class BatchOptions:
    inputs: list[Path]
    outdir: Path
    fmt: str
    preset: Preset
    model: str
    device: torch.device
    recursive: bool = False
    batch_size: int = 1
    overwrite: bool = False
    seed: int | None = None
    size: str | None = None
    fit: str = "crop"
    quality: int = 70
    json_path: Path | None = None


# Listing inputs


def is_image_name(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def absolute(path: Path | str) -> str:
    """Absolute and normalised, symlinks kept: a key for 'the same path'."""
    return os.path.normcase(os.path.abspath(path))


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def glob_base(pattern: str) -> Path:
    """The leading components of a glob that hold no wildcard: the folder its matches are relative to."""
    parts = Path(pattern).parts
    literal = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def relative(path: Path, base: Path) -> PurePosixPath:
    """path below base as a clean relative POSIX path; the bare name when that is impossible."""
    try:
        rel = PurePosixPath(*Path(os.path.relpath(path, base)).parts)
    except ValueError:  # another drive
        rel = PurePosixPath(path.name)
    if not rel.parts or any(p in ("", ".", "..") for p in rel.parts) or rel.is_absolute():
        rel = PurePosixPath(path.name)
    return rel


def collect_inputs(inputs: list[Path], recursive: bool, outdir: Path, fmt: str) -> list[Job]:
    """Every input file, in the order given (a folder's or a glob's files sorted), each once."""
    jobs: list[Job] = []
    seen: set[str] = set()
    out_abs = absolute(outdir)

    def add(path: Path, base: Path) -> None:
        key = absolute(path)
        if key not in seen:
            seen.add(key)
            jobs.append(Job(path, relative(path, base)))

    def check_not_in_outdir(base: Path) -> None:
        # mp4 outputs are never images; gif, webp and png frames would be read as inputs on the next run
        if fmt != "mp4" and is_within(absolute(base), out_abs):
            raise AnimateError(f"-o {outdir} holds the input folder {base}: with --format {fmt} the outputs "
                               "would be read as images on the next run; pick an -o outside the inputs")

    def scan(folder: Path, base: Path) -> None:
        check_not_in_outdir(folder)
        skip_outdir = not is_within(absolute(folder), out_abs)
        found = []
        for root, dirs, files in os.walk(folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if recursive and not d.startswith(".")
                             and not (skip_outdir and absolute(Path(root, d)) == out_abs))
            found += [Path(root, f) for f in files if not f.startswith(".") and is_image_name(f)]
        for path in sorted(found, key=lambda p: relative(p, base).as_posix()):
            add(path, base)

    for given in inputs:
        text = str(given)
        if given.is_dir():
            scan(given, given)
        elif given.exists() or given.is_symlink():
            add(given, given.parent)  # named directly: read as is, whatever its suffix
        elif glob.has_magic(text):
            base = glob_base(text)
            matches = sorted(glob.glob(text, recursive=recursive))
            if not matches:
                raise AnimateError(f"{text}: no file matches")
            check_not_in_outdir(base)
            skip_outdir = not is_within(absolute(base), out_abs)
            for match in map(Path, matches):
                if match.is_dir():
                    scan(match, base)
                elif is_image_name(match) and not (skip_outdir and is_within(absolute(match), out_abs)):
                    add(match, base)
        else:
            raise AnimateError(f"{given}: no such file or folder")
    if not jobs:
        raise AnimateError(f"no images found in {', '.join(map(str, inputs))} "
                           f"(suffixes {' '.join(IMAGE_SUFFIXES)}{'' if recursive else '; --recursive descends'})")
    return jobs


# Naming outputs


def path_digest(path: Path) -> str:
    return hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()


def output_name(job: Job, rung: int, suffix: str) -> str:
    """rung 0: photo.mp4, 1: photo.jpg.mp4, 2: photo.jpg.0123456789.mp4, 3: photo.jpg.<64 hex>.mp4"""
    if rung == 0:
        return job.rel.stem + suffix
    if rung == 1:
        return job.rel.name + suffix
    digest = path_digest(job.source)
    return f"{job.rel.name}.{digest[:10] if rung == 2 else digest}{suffix}"


def assign_outputs(jobs: list[Job], outdir: Path, fmt: str) -> None:
    """Set job.output for every job: distinct, below outdir, never an input's path or the manifest's."""
    suffix = "" if fmt == "png" else f".{fmt}"
    reserved = {absolute(outdir / MANIFEST_NAME).casefold()}
    reserved |= {absolute(j.source).casefold() for j in jobs}
    reserved |= {os.path.normcase(os.path.realpath(j.source)).casefold() for j in jobs}
    rungs = [0] * len(jobs)

    def path_of(i: int) -> Path:
        return outdir.joinpath(*jobs[i].rel.parent.parts, output_name(jobs[i], rungs[i], suffix))

    while True:
        claims: dict[str, list[int]] = {}
        for i in range(len(jobs)):
            claims.setdefault(absolute(path_of(i)).casefold(), []).append(i)
        moved = False
        for key, claimants in claims.items():
            if len(claimants) > 1 or key in reserved:
                for i in claimants:
                    if rungs[i] < 3:
                        rungs[i] += 1
                        moved = True
        if not moved:
            break
    for i, job in enumerate(jobs):
        job.output = path_of(i)


def derive_seed(seed: int, rel: PurePosixPath) -> int:
    """The seed of one input from --seed S and its relative path: independent of order and batching."""
    digest = hashlib.sha256(f"{seed}:{rel.as_posix()}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % 2**31


# Output folder housekeeping


def remove_temporaries(outdir: Path) -> int:
    """Remove what a killed run left: hidden temporary names (TEMPORARY) below outdir, and nothing else."""
    removed = 0
    for root, dirs, files in os.walk(outdir, followlinks=False):
        for name in [*files, *dirs]:
            if TEMPORARY.match(name):
                path = Path(root, name)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        dirs[:] = [d for d in dirs if not TEMPORARY.match(d)]
    return removed


def safe_output_folder(output: Path, outdir: Path) -> None:
    """Create output's folder; refuse one that leads outside outdir (through a symlink)."""
    folder = output.parent
    folder.mkdir(parents=True, exist_ok=True)
    real_out, real_folder = os.path.realpath(outdir), os.path.realpath(folder)
    if not is_within(real_folder, real_out):
        raise AnimateError(f"{folder} leads outside {outdir} (a symlink); not writing there")


class Manifest:
    """OUTDIR/animate-manifest.jsonl: appended one whole line at a time, fsynced, locked while open."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            self.lock()
            size = os.fstat(self.fd).st_size
            if size and os.pread(self.fd, 1, size - 1) != b"\n":
                self.write(b"\n")  # close a torn last line: it stays unreadable, the next ones do not
        except BaseException:
            os.close(self.fd)
            raise

    def lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AnimateError(f"another animate run is writing to {self.path.parent} "
                               "(its manifest is locked); wait for it or pick another -o") from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def append(self, record: dict) -> None:
        self.write((json.dumps(record, default=str, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        os.close(self.fd)  # releases the lock


def read_manifest(path: Path) -> list[dict]:
    """Every readable line of a manifest; a torn or foreign line is skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# Interrupts


class Abandoned(Exception):
    """Raised from the step callback: the current image is given up because the run was interrupted."""


class Interrupts:
    """SIGINT and SIGTERM set a flag, checked between images and between denoising steps; a second one
    raises KeyboardInterrupt at once. Installed only in the main thread; the old handlers come back."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


# Progress


class BatchProgress:
    """A rich display (images bar, and the current image's denoising steps) on a terminal; one plain line
    per image otherwise."""

    def __init__(self, total: int):
        self.total, self.count = total, 0
        self.progress = None

    def __enter__(self) -> BatchProgress:
        if out.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=out.stderr, transient=True)
            self.progress.start()
            self.images = self.progress.add_task("images", total=self.total)
            self.steps = self.progress.add_task("denoising", total=1, visible=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, names: list[str], steps: int) -> None:
        if self.progress is not None:
            label = names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"
            self.progress.reset(self.steps, total=steps, completed=0, visible=True,
                                description=f"denoising {escape(label)}")

    def step(self, i: int) -> None:
        if self.progress is not None:
            self.progress.update(self.steps, completed=i + 1)

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self.progress is not None:
            self.progress.update(self.images, completed=self.count)
            if self.count >= self.total:
                self.progress.update(self.steps, visible=False)

    def line(self, message: str) -> None:
        out.info(f"[{self.count}/{self.total}] {escape(message)}")

    def failure(self, message: str) -> None:
        out.warn(f"[{self.count}/{self.total}] {escape(message)}")


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# The run


class Writer:
    """Writes videos on one background thread, so the CPU encodes one group's videos while the GPU generates
    the next. What a write gives (done or failed) is recorded by the main thread, in submission order, when it
    collects: before it submits the next group's writes, and at the end of the run."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="animate-writer")
        self.pending: list[tuple[object, object]] = []  # (future, what to do with it in the main thread)

    def submit(self, write, on_done) -> None:
        self.pending.append((self.executor.submit(write), on_done))

    def collect(self) -> None:
        """Wait for every write submitted so far and record each. A KeyboardInterrupt while waiting leaves the
        write it waited for pending, to be recorded by close()."""
        while self.pending:
            future, on_done = self.pending[0]
            future.exception()  # waits; the write's own errors come back through its result
            self.pending.pop(0)
            on_done(future)

    def close(self) -> None:
        """Record every write. On a second signal (KeyboardInterrupt) start no more: the write under way ends
        (ffmpeg finishes, its temporary file renamed or removed), the ones not started are dropped and their
        images get no manifest line, like any image abandoned by an interrupt."""
        try:
            self.collect()
        except KeyboardInterrupt:
            self.executor.shutdown(wait=True, cancel_futures=True)
            for future, on_done in self.pending:
                if not future.cancelled():
                    on_done(future)
            self.pending.clear()
        finally:
            self.executor.shutdown(wait=True)


@dataclass
class Pending:
    job: Job
    image: Image.Image  # at the output size
    seed: int
    read_s: float  # reading and fitting the image


@dataclass
class RunState:
    options: BatchOptions
    manifest: Manifest
    progress: BatchProgress
    stop: Interrupts
    model: object | None = None
    load_s: float = 0.0
    records: list[dict] = field(default_factory=list)
    writer: Writer = field(default_factory=Writer)


def out_of_memory_types() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,)


def run_batch(options: BatchOptions) -> dict:
    """Animate every input; returns the summary. Raises AnimateError with exit code 1 when any input
    failed, 128 + signal when interrupted, 2 for usage errors (before anything is written)."""
    started = time.perf_counter()
    outdir = options.outdir
    if outdir.exists() and not outdir.is_dir():
        raise AnimateError(f"-o {outdir}: with several images or a folder, -o names a folder, and this is a file")
    if not outdir.exists() and outdir.suffix.lower().lstrip(".") in ("mp4", "gif", "webp"):
        raise AnimateError(f"-o {outdir}: with several images or a folder, -o names a folder (OUTDIR), not a file")
    jobs = collect_inputs(options.inputs, options.recursive, outdir, options.fmt)
    assign_outputs(jobs, outdir, options.fmt)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnimateError(f"cannot create -o {outdir}: {e.strerror or e}") from None
    if not os.access(outdir, os.W_OK):
        raise AnimateError(f"cannot write to -o {outdir}")
    manifest = Manifest(outdir / MANIFEST_NAME)
    try:
        removed = remove_temporaries(outdir)
        if removed:
            out.info(f"removed {removed} temporary file(s) left in {escape(str(outdir))} by an interrupted run")
        if options.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(options.device)
        with Interrupts() as stop, BatchProgress(len(jobs)) as progress:
            state = RunState(options, manifest, progress, stop)
            try:
                run_jobs(state, jobs)
            except KeyboardInterrupt:  # a second signal: stop now
                stop.signum = stop.signum or signal.SIGINT
            finally:
                state.writer.close()  # the videos still being written, recorded before the manifest closes
    finally:
        manifest.close()
    summary = summarize(state, jobs, time.perf_counter() - started)
    out.result(summary_tables(summary))
    if options.json_path is not None:
        from animate_cli.report import write_json

        write_json(options.json_path, summary)
    images = summary["images"]
    if stop.requested:
        name = signal.Signals(stop.signum).name
        raise AnimateError(f"interrupted ({name}): {images['done']} done in this run, {images['not_run']} not run; "
                           "the same command again finishes the rest", exit_code=128 + stop.signum)
    if images["failed"]:
        raise AnimateError(f"{images['failed']} of {images['total']} images failed; reasons in {manifest.path}",
                           exit_code=1)
    return summary


def run_jobs(state: RunState, jobs: list[Job]) -> None:
    options = state.options
    existing = [j for j in jobs if not options.overwrite and os.path.lexists(j.output)]
    if existing:
        out.info(f"skipping {len(existing)} of {len(jobs)} inputs whose output exists in {escape(str(options.outdir))} "
                 "(--overwrite redoes them)")
    existing_ids = {id(j) for j in existing}
    groups: dict[tuple[int, int], list[Pending]] = {}
    for job in jobs:
        if state.stop.requested:
            return
        if id(job) in existing_ids:
            record(state, job, "skipped")
            continue
        pending = prepare(state, job)
        if pending is None:
            continue
        key = pending.image.size
        groups.setdefault(key, []).append(pending)
        if len(groups[key]) >= options.batch_size:
            run_group(state, groups.pop(key))
    for key in list(groups):
        if state.stop.requested:
            return
        run_group(state, groups.pop(key))


def ensure_model(state: RunState):
    """The model, loaded once, on the first image that needs it (a run of skips never loads it)."""
    if state.model is None:
        from animate_cli import report
        from animate_cli.runner import open_model

        options = state.options
        out.info(escape(f"loading {options.model} ({options.preset.name}, {options.device})"))
        start = time.perf_counter()
        state.model = open_model(options.model, options.preset, options.device, progress=not out.quiet)
        state.load_s = time.perf_counter() - start
        if state.model.random_weights:
            out.warn(escape(f"{state.model.source} has {report.RANDOM_WEIGHTS_NOTE}"))
    return state.model


IMAGE_ERRORS = (AnimateError, OSError, ValueError, MemoryError, Image.DecompressionBombError)


def image_error(job: Job, e: Exception) -> str:
    """The manifest's reason for a failed image: our own message, else the file and the exception."""
    return str(e) if isinstance(e, AnimateError) else f"{job.source}: {type(e).__name__}: {e}"


def prepare(state: RunState, job: Job) -> Pending | None:
    """The image read and fitted, its seed chosen and its output folder made; None (and a failed line)
    when any of that fails."""
    options = state.options
    seed = None if options.seed is None else derive_seed(options.seed, job.rel)
    start = time.perf_counter()
    try:
        image = load_image(job.source)  # a bad image fails before the model loads
    except IMAGE_ERRORS as e:
        record(state, job, "failed", error=image_error(job, e), seed=seed)
        return None
    load_s = time.perf_counter() - start
    model = ensure_model(state)  # a model that does not load is the run's error, not this image's
    start = time.perf_counter()
    try:
        width, height = resolve_size(options.size, image, model.native_size, model.size_multiple)
        fitted = fit_image(image, (width, height), options.fit)
        safe_output_folder(job.output, options.outdir)
    except IMAGE_ERRORS as e:
        record(state, job, "failed", error=image_error(job, e), seed=seed)
        return None
    if seed is None:
        from animate_cli.runner import draw_seed

        seed = draw_seed()
    return Pending(job, fitted, seed, load_s + time.perf_counter() - start)


def run_group(state: RunState, group: list[Pending]) -> None:
    """Animate images of one size together; on out-of-memory or any error in a batch, each image alone."""
    from animate_cli.runner import settings_for

    options = state.options
    model = ensure_model(state)
    width, height = group[0].image.size
    settings = settings_for(options.preset, model, width, height)
    try:
        frames, timer, used, retried = generate_with_retry(state, group, settings)
    except Abandoned:
        out.info(escape(f"interrupted: abandoned {', '.join(p.job.rel.as_posix() for p in group)} (nothing written)"))
        return
    except Exception as e:
        if state.stop.requested:  # a child process (ffmpeg) or the device may fail from the same signal
            return
        if len(group) > 1:
            for pending in group:  # isolate: one image's failure must not fail its batch partners
                if state.stop.requested:
                    return
                run_group(state, [pending])
            return
        pending = group[0]
        if isinstance(e, out_of_memory_types()):
            error = (f"out of GPU memory, also after a retry with decode chunk {retried_chunk(settings)}: "
                     f"lower {OOM_KNOBS}")
        else:
            error = f"{type(e).__name__}: {e}"
        record(state, pending.job, "failed", error=error, seed=pending.seed, settings=settings)
        return
    n = len(group)
    frames = frames.cpu()  # the device's copy can go; the writer encodes from this one
    state.writer.collect()  # the previous group's videos, written while this group was generated
    for i, pending in enumerate(group):
        stages = {name: seconds / n for name, seconds in timer.stages.items()}
        stages["preprocess"] = stages.get("preprocess", 0.0) + pending.read_s

        def write(video=frames[i], pending=pending) -> tuple[float, str | None, bool]:
            """(seconds, error or None, whether the run had been interrupted when the write failed)."""
            start = time.perf_counter()
            try:
                write_video(video, pending.job.output, options.fmt, used.fps, options.quality)
            except (AnimateError, OSError, ValueError, RuntimeError) as e:
                return time.perf_counter() - start, str(e), state.stop.requested
            return time.perf_counter() - start, None, False

        def written(future, pending=pending, stages=stages) -> None:
            seconds, error, interrupted = future.result()
            if error is None:
                stages["write"] = seconds
                record(state, pending.job, "done", seed=pending.seed, settings=used, stages=stages, batch=n,
                       retried=retried)
            elif interrupted:  # ffmpeg got the terminal's Ctrl-C too: abandoned, not failed
                out.info(escape(f"interrupted: abandoned {pending.job.rel} while writing (nothing written)"))
            else:
                record(state, pending.job, "failed", error=f"writing {pending.job.output}: {error}",
                       seed=pending.seed, settings=used)

        state.writer.submit(write, written)


def retried_chunk(settings) -> int:
    return max(1, settings.decode_chunk // 2)


def generate_with_retry(state: RunState, group: list[Pending], settings):
    """(frames, timer, settings used, retried): one retry with half the decode chunk on out-of-memory, for a
    single image (a batch that runs out of memory is split by the caller instead)."""
    from animate_cli import pipeline
    from animate_cli.timing import StageTimer

    model = ensure_model(state)
    progress, stop = state.progress, state.stop

    def on_step(i: int) -> None:
        if stop.requested:
            raise Abandoned
        progress.step(i)

    attempts = [settings]
    if len(group) == 1 and retried_chunk(settings) < settings.decode_chunk:
        attempts.append(dataclasses.replace(settings, decode_chunk=retried_chunk(settings)))
    for attempt, used in enumerate(attempts):
        if stop.requested:
            raise Abandoned
        timer = StageTimer(model.device)
        progress.start([p.job.rel.as_posix() for p in group], used.steps)
        try:
            frames = pipeline.generate(model, [p.image for p in group], [p.seed for p in group], used, timer,
                                       on_step=on_step)
        except out_of_memory_types():
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            if attempt + 1 == len(attempts):
                raise
            out.warn(escape(f"out of GPU memory on {group[0].job.rel}; retrying with decode chunk "
                            f"{retried_chunk(settings)}"))
            continue
        return frames, timer, used, attempt > 0
    raise AssertionError("unreachable")


def record(state: RunState, job: Job, status: str, *, error: str | None = None, seed: int | None = None,
           settings=None, stages: dict | None = None, batch: int | None = None, retried: bool = False) -> None:
    """One manifest line, one progress step and one log line for one input."""
    options = state.options
    line = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": str(job.source),
        "rel": job.rel.as_posix(),
        "output": str(job.output),
        "status": status,
        "error": error,
        "seed": seed,
        "base_seed": options.seed,
        "preset": options.preset.name,
        "model": options.model,
        "format": options.fmt,
        "settings": None if settings is None else {
            **vars(settings), "dtype": options.preset.dtype, "fit": options.fit, "quality": options.quality},
        "timing_s": None if stages is None else {**stages, "total": sum(stages.values())},
        "batch": batch,
        "retried_smaller_decode_chunk": retried,
    }
    state.manifest.append(line)
    state.records.append(line)
    progress = state.progress
    progress.advance()
    if status == "done":
        progress.line(f"done {job.rel} -> {job.output} (seed {seed}, {line['timing_s']['total']:.2f} s)")
    elif status == "failed":
        progress.failure(f"failed: {error}" if str(error).startswith(str(job.source)) else
                         f"failed {job.source}: {error}")


# The summary


def spread(values: list[float]) -> dict:
    """median, min, max and the quartiles of one stage's seconds across images."""
    ordered = sorted(values)
    q1, q3 = (statistics.quantiles(ordered, n=4, method="inclusive")[i] for i in (0, 2)) if len(ordered) > 1 \
        else (ordered[0], ordered[0])
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "p25": q1, "p75": q3}


def summarize(state: RunState, jobs: list[Job], wall_s: float) -> dict:
    from animate_cli import report

    options = state.options
    counts = {s: sum(r["status"] == s for r in state.records) for s in STATUSES}
    done = [r for r in state.records if r["status"] == "done"]
    stage_names = list(dict.fromkeys(name for r in done for name in r["timing_s"]))
    model = state.model
    return {
        "outdir": str(options.outdir),
        "manifest": str(options.outdir / MANIFEST_NAME),
        "images": {"total": len(jobs), **counts, "not_run": len(jobs) - len(state.records)},
        "interrupted": state.stop.requested,
        "wall_s": wall_s,
        "load_s": state.load_s,
        "videos_per_minute": counts["done"] / wall_s * 60 if wall_s > 0 else 0.0,
        "stages_s": {name: spread([r["timing_s"].get(name, 0.0) for r in done]) for name in stage_names},
        "failures": [{"input": r["input"], "error": r["error"]} for r in state.records if r["status"] == "failed"],
        "format": options.fmt,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "model": options.model,
        "random_weights": None if model is None else model.random_weights,
        "preset": options.preset.as_dict(),
        "device": str(options.device),
        "device_name": report.device_name(options.device),
        "peak_memory_gib": report.peak_memory_gib(options.device),
        "versions": report.versions(),
    }


def summary_tables(summary: dict):
    from rich.console import Group
    from rich.table import Table

    images = summary["images"]
    run = Table(title=f"batch -> {escape(summary['outdir'])}", title_justify="left")
    run.add_column("images")
    run.add_column("", justify="right")
    for name in ("done", "skipped", "failed"):
        run.add_row(name, str(images[name]))
    if images["not_run"]:
        run.add_row("not run (interrupted)", str(images["not_run"]))
    run.add_row("wall time", f"{summary['wall_s']:.1f} s")
    run.add_row("videos/min", f"{summary['videos_per_minute']:.2f}")
    if summary["load_s"]:
        run.add_row("model load", f"{summary['load_s']:.1f} s")
    if summary["peak_memory_gib"] is not None:
        run.add_row("peak GPU memory", f"{summary['peak_memory_gib']:.2f} GiB")
    if not summary["stages_s"]:
        return run
    stages = Table(title="seconds per image", title_justify="left")
    for name, justify in (("stage", "left"), ("median", "right"), ("p25-p75", "right"), ("min-max", "right")):
        stages.add_column(name, justify=justify)
    for name, s in summary["stages_s"].items():
        stages.add_row(name, f"{s['median']:.3f}", f"{s['p25']:.3f}-{s['p75']:.3f}", f"{s['min']:.3f}-{s['max']:.3f}")
    if summary["batch_size"] > 1:
        stages.caption = "a batch's shared stages are split evenly among its images"
    return Group(run, stages)

