"""Write ListOps and Pathfinder / Path-X data in LRA's released formats, so the same loaders read them.

    from longrange.lra.generate import generate
    generate("listops", "data/listops-1000", train=2000, val=200, test=200, seed=0)
    generate("listops", "data/listops", paper_sizes=True, workers=16)   # 96,000/2,000/2,000 on 16 processes
    generate("pathfinder", "data/pathfinder32", train=800, seed=0)        # 800/100/100 images
    generate("pathx", "data/pathfinder128", paper_sizes=True)             # 160,000/20,000/20,000
    ds = longrange.lra.load_split("pathfinder", "train", "data/pathfinder32")

ListOps: `basic_{train,val,test}.tsv` with header `Source<TAB>Target`, every pair in parentheses, from
the published rules (`longrange.lra.listops`); defaults are the paper's settings (500 < length < 2000,
max_depth 10, max_args 10) at small sizes (1000/100/100); `paper_sizes=True` gives 96,000/2,000/2,000.
`workers=N` draws the trees in N processes: the files are byte-identical to those of one process.

Every file is written atomically (a temporary file beside it, renamed into place): a full disk or
Ctrl-C leaves the old file or none, never one cut mid-row. `progress(done, total, note)` is called
as the work advances (ListOps: distinct trees kept / needed, with the candidates drawn; Pathfinder:
images drawn); `summarize(task, paths)` says what the files hold.

Pathfinder: `{difficulty}/imgs/{k}/sample_{j}.png` and `{difficulty}/metadata/{k}.npy` (text, one
line per image: `imgs/{k} sample_{j}.png {j} {label}`), `images_per_folder` images per folder. The
release carries no split: the loader takes 80/10/10 of all images, so the sizes asked for must be in
that ratio (give only `train` and val = test = train // 8). `paper_sizes=True` gives 200,000 images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from longrange.core.files import atomic_write, atomic_write_text
from longrange.lra import listops
from longrange.lra.loaders import PATHFINDER_DIFFICULTY, pathfinder_split_sizes
from longrange.lra.pathfinder import DIFFICULTIES, PathfinderStyle, balanced_labels, draw_example

LISTOPS_SIZES = (1000, 100, 100)
PATHFINDER_TRAIN = 800  # -> 800 / 100 / 100
PATHFINDER_PAPER_IMAGES = 200_000  # per difficulty in the release
GENERATED_TASKS = ("listops", "pathfinder", "pathx")


Progress = Callable[[int, int, str], None]


def generate(task: str, out_dir: str | Path, *, train: int | None = None, val: int | None = None,
             test: int | None = None, seed: int = 0, paper_sizes: bool = False, workers: int = 1,
             progress: Progress | None = None, **options) -> list[Path]:
    """Generate `task` ("listops", "pathfinder" or "pathx") into out_dir and return the written paths.

    ListOps options: min_length, max_length, max_depth, max_args (the generator's rules).
    Pathfinder options: resolution (32; 128 for "pathx"), difficulty (`curv_contour_length_14`, or
    `curv_baseline`, `curv_contour_length_9`), images_per_folder (1000), and PathfinderStyle fields
    (num_dashes, dash, gap, max_turn, num_distractors, dot_radius, margin).
    workers: processes drawing ListOps trees (the output does not depend on it); Pathfinder: 1 only.
    progress(done, total, note): see the module docstring.
    Returns the TSV files (ListOps) or the metadata files and image folders (Pathfinder).
    """
    out_dir = Path(out_dir)
    if task == "listops":
        sizes = listops.PAPER_SIZES if paper_sizes else LISTOPS_SIZES
        sizes = tuple(_default(given, n) for given, n in zip((train, val, test), sizes, strict=True))
        return write_listops(out_dir, sizes, seed=seed, workers=workers, progress=progress, **options)
    if workers != 1 and task in ("pathfinder", "pathx"):
        raise ValueError(f"workers: only ListOps is generated in parallel; got workers={workers} for {task!r}")
    if task in ("pathfinder", "pathx"):
        sizes = _pathfinder_sizes(train, val, test, paper_sizes)
        resolution = options.pop("resolution", 128 if task == "pathx" else 32)
        return write_pathfinder(out_dir, sum(sizes), seed=seed, resolution=int(resolution), progress=progress,
                                **options)
    raise ValueError(f"task: can generate {GENERATED_TASKS}, got {task!r} (text, retrieval and image need the "
                     "real data; `load_split(task, split)` without data_dir gives synthetic stand-ins)")


def write_listops(out_dir: Path, sizes: tuple[int, int, int], *, seed: int = 0, workers: int = 1,
                  progress: Progress | None = None, **rules) -> list[Path]:
    """`basic_{train,val,test}.tsv` from one deduplicated draw of sum(sizes) trees, cut in that order."""
    unknown = sorted(set(rules) - set(listops.PAPER))
    if unknown:
        raise ValueError(f"generate('listops'): unknown option(s) {unknown}; expected some of {sorted(listops.PAPER)}")
    drawn = None if progress is None else \
        (lambda kept, num, draws: progress(kept, num, f"{draws:,} candidate trees drawn"))
    examples = listops.generate_examples(sum(sizes), seed=seed, workers=workers, progress=drawn,
                                         **{**listops.PAPER, **rules})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for split, size in zip(("train", "val", "test"), sizes, strict=True):
        rows = examples[start:start + size]

        def write(tmp: Path, rows=rows) -> None:
            with tmp.open("w", encoding="utf-8", newline="") as f:
                f.write("Source\tTarget\n")
                f.writelines(f"{text}\t{label}\n" for text, label in rows)

        paths.append(atomic_write(out_dir / f"basic_{split}.tsv", write))
        start += size
    return paths


def write_pathfinder(out_dir: Path, num_images: int, *, seed: int = 0, resolution: int = 32,
                     difficulty: str = PATHFINDER_DIFFICULTY, images_per_folder: int = 1000,
                     progress: Progress | None = None, **style_options) -> list[Path]:
    """`num_images` images with balanced labels as out_dir/difficulty/{imgs/k/*.png, metadata/k.npy}."""
    from PIL import Image

    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    if images_per_folder < 1:
        raise ValueError(f"images_per_folder: expected a positive int, got {images_per_folder}")
    try:
        style = PathfinderStyle.for_resolution(resolution, difficulty, **style_options)
    except TypeError:
        raise ValueError(f"generate('pathfinder'): unknown option(s) among {sorted(style_options)}") from None
    root = out_dir / difficulty
    labels = balanced_labels(num_images, np.random.default_rng([seed, 2**31 - 1]))
    written: list[Path] = []
    for folder_start in range(0, num_images, images_per_folder):
        k = folder_start // images_per_folder
        folder = root / "imgs" / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for j, i in enumerate(range(folder_start, min(folder_start + images_per_folder, num_images))):
            image, _ = draw_example(np.random.default_rng([seed, i]), style, int(labels[i]))
            # no fsync per image (200,000 of them): the rename alone keeps a half-written PNG out
            atomic_write(folder / f"sample_{j}.png",
                         lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG"), sync=False)
            lines.append(f"imgs/{k} sample_{j}.png {j} {labels[i]}\n")
            if progress is not None:
                progress(i + 1, num_images, "images")
        meta = root / "metadata" / f"{k}.npy"  # a text file, named .npy as in the release; after its images
        meta.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta, "".join(lines))
        written += [meta, folder]
    return written


def summarize(task: str, paths: list[Path]) -> str:
    """What the generated files hold, read back from them: examples per ListOps file; images, labels,
    folders and metadata files for Pathfinder."""
    if task == "listops":
        parts = []
        for path in paths:
            rows = _count_lines(path) - 1 if path.is_file() else None
            parts.append(f"{path} ({'?' if rows is None else f'{rows:,}'} examples)")
        return "wrote " + ", ".join(parts)
    metas = [p for p in paths if p.suffix == ".npy" and p.is_file()]
    labels = [line.split()[3] for meta in metas for line in meta.read_text(encoding="utf-8").splitlines()
              if len(line.split()) >= 4]
    folders = [p for p in paths if p.is_dir()]
    root = metas[0].parent.parent if metas else (paths[0].parent if paths else "?")
    return (f"wrote {len(labels):,} images ({labels.count('1'):,} connected, {labels.count('0'):,} not) in "
            f"{len(folders)} folder(s) under {root}/imgs, listed in {len(metas)} metadata file(s) under "
            f"{root}/metadata")


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _pathfinder_sizes(train, val, test, paper_sizes: bool) -> tuple[int, int, int]:
    """(train, val, test) in the loader's 80/10/10 ratio, from what was given."""
    if paper_sizes and train is None:
        return pathfinder_split_sizes(PATHFINDER_PAPER_IMAGES)
    train = PATHFINDER_TRAIN if train is None else train
    val = train // 8 if val is None else val
    test = train // 8 if test is None else test
    sizes = (train, val, test)
    if min(sizes) < 0 or sum(sizes) == 0:
        raise ValueError(f"train, val, test: expected non-negative sizes, not all zero, got {sizes}")
    expected = pathfinder_split_sizes(sum(sizes))
    if sizes != expected:
        raise ValueError(f"train, val, test: Pathfinder files carry no split; the loader takes 80/10/10 of all "
                         f"images, which for {sum(sizes)} images is {expected}, not {sizes}; give only train "
                         f"(val = test = train // 8) or sizes in that ratio")
    return sizes


def _default(given: int | None, default: int) -> int:
    """`given` as a non-negative int, or `default` when None."""
    if given is None:
        return default
    if int(given) < 0:
        raise ValueError(f"sizes: expected non-negative ints, got {given}")
    return int(given)
