"""Evaluation input: any dataset in the TPRU layout, read row by row, each row turned back into a ``Question``.

Layouts: a parquet file, a folder of parquet files (``DIR/*.parquet``, ``DIR/{train,test}/*.parquet``, Hub-style
``DIR/data/test-00000-of-00001.parquet``), or a folder written by ``datasets.save_to_disk``. Columns: ``problem``
(text with one ``<image>`` per image), ``images`` (``{"bytes", "path"}`` structs), ``answer``; optional ``task``,
``domain``, ``negative``, ``episode_id`` and ``id`` (else a stable content hash is the id).

Rows written by this project's builder carry exactly the text :mod:`tpru_agent.tasks` renders; foreign rows (the
authors' TPRU-test) are read by a tolerant parser of the problem text that finds the option letters, the "None of
the choices provided" letter, the image labels and the context steps, and keeps ``problem`` verbatim.

Example:
    >>> from tpru_agent.finetune.eval.dataset import open_dataset
    >>> data = open_dataset("data/tpru-mini")             # doctest: +SKIP
    >>> row = next(iter(data)); question = row.question()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tpru_agent.errors import ConfigError, FrameError, require
from tpru_agent.finetune.data.tpru_format import cell_bytes, decode_image, parquet_files, stored_budget
from tpru_agent.tasks import IMAGE, LETTERS, TASKS, Option, Question

COLUMNS = ("id", "problem", "images", "answer", "task", "domain", "negative", "episode_id")
log = logging.getLogger(__name__)
SPLIT_NAMES = ("test", "validation", "val", "eval", "train")

# An option marker: "A." / "A)" / "(A)" / "A:" at a line start or after whitespace, but not an image label
# ("Image A: <image>") - labels are told apart by the word before them.
_MARKER = re.compile(r"(?:(?<=\s)|^)(?:Option\s+)?\(?([A-J])(?:\)|\.|:|：)\s*", re.MULTILINE)
_LABEL_WORDS = ("image", "frame", "picture", "photo", "img")
_NONE = re.compile(r"none\s+of\s+(the\s+)?(choices|options|above|candidates)(\s+(is\s+)?(provided|given|correct))?"
                   r"|^none\b", re.IGNORECASE)
_PERM = re.compile(r"^([A-J])(?:\s*(?:-|–|→|->|>|,|\s)\s*([A-J])|([A-J])){1,9}\b")
_STEP_IMAGE = re.compile(r"(?:step\s+(\d+)|final\s+step)\s*[:：.)-]?\s*" + re.escape(IMAGE), re.IGNORECASE)
_LABEL_IMAGE = re.compile(r"(?:image|frame|picture|photo|img)\s*([A-J])\s*[:：.)-]?\s*" + re.escape(IMAGE),
                          re.IGNORECASE)
_TARGET = re.compile(r"step\s+(\d+)\s*\??", re.IGNORECASE)
_PREVIOUS_WORDS = re.compile(r"\b(previous|preceding|before|earlier|first step|prior)\b", re.IGNORECASE)
_DESCRIPTION = re.compile(r"These photos show the process of (.+?)\.(?:\s|$)")


def _classify(body: str):
    """What an option body holds: ``("image", None)``, ``("none", None)``, ``("perm", "ABCD")`` or ``None``."""
    text = body.strip()
    if text.startswith(IMAGE):
        return "image", None
    if _NONE.match(text):
        return "none", None
    match = _PERM.match(text)
    if match:
        letters = re.findall(r"[A-J]", match.group(0))
        if len(letters) >= 2 and len(set(letters)) == len(letters):
            return "perm", "".join(letters)
    return None


def parse_options(problem: str) -> list[tuple[str, str, str | None]]:
    """The lettered options of a problem text: ``[(letter, kind, value)]`` with kind image / none / perm.

    Only markers whose body is an image, the "None" text or a permutation count, and only the last run of
    letters that starts at A and goes up one by one (so a stray "A." in the prose is not an option).
    """
    marks = []
    for match in _MARKER.finditer(problem):
        before = problem[max(0, match.start() - 12):match.start()].strip().lower()
        if before.endswith(_LABEL_WORDS):
            continue
        marks.append(match)
    found = []
    for i, match in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(problem)
        kind = _classify(problem[match.end():end])
        if kind is not None:
            found.append((match.group(1), *kind))
    runs: list[list] = []
    for item in found:
        if item[0] == "A":
            runs.append([item])
        elif runs and ord(item[0]) == ord(runs[-1][-1][0]) + 1:
            runs[-1].append(item)
    runs = [r for r in runs if len(r) >= 2]
    return runs[-1] if runs else []


def _choice_steps(problem: str, n_context: int, task: str | None) -> tuple[str, tuple[int, ...], int]:
    """Task (next / previous), context step numbers and target step of a candidates question."""
    found = _STEP_IMAGE.findall(problem)  # "" for a "Final step" image: the step after the one asked about
    numbered = [int(s) for s in found if s]
    steps = tuple(int(s) if s else max(numbered, default=0) + 2 for s in found)
    if len(steps) != n_context:
        steps = ()
    if task not in ("next", "previous"):
        if steps:
            task = "previous" if min(steps) > 1 else "next"
        else:
            task = "previous" if _PREVIOUS_WORDS.search(problem) else "next"
    if not steps:
        steps = tuple(range(2, n_context + 2)) if task == "previous" else tuple(range(1, n_context + 1))
    asked = [int(m.group(1)) for m in _TARGET.finditer(_STEP_IMAGE.sub("", problem)) if int(m.group(1)) not in steps]
    if asked:
        target = asked[-1]
    elif task == "previous":
        target = min(steps) - 1
    else:
        target = next(s for s in itertools.count(1) if s not in steps)
    return task, steps, target


def question_from_problem(problem: str, answer: str, *, n_images: int, task: str | None = None,
                          negative: bool | None = None) -> Question:
    """Rebuild the :class:`Question` a row asks, from its text (``problem`` is kept verbatim).

    Args:
        problem: the row's question text, one ``<image>`` per image.
        answer: the ground truth (a letter or a label permutation); validated against the rebuilt question.
        n_images: how many images the row carries.
        task: the row's ``task`` column when it has one (``ordering``, ``ordering_mcq``, ``next``, ``previous``).
        negative: the row's ``negative`` column; without one, a row whose answer is the "None" letter is negative.

    Raises:
        ConfigError: the text and images disagree, no answer form can be found, or the answer does not fit it.
    """
    if problem.count(IMAGE) != n_images:
        raise ConfigError(f"the problem has {problem.count(IMAGE)} {IMAGE} placeholders but the row has "
                          f"{n_images} images")
    task = task if task in TASKS else None
    answer = answer.strip()
    options = parse_options(problem)
    description = (m.group(1) if (m := _DESCRIPTION.search(problem)) else None)
    if options and task != "ordering" and not (len(answer) > 1 and task is None):
        kinds = {kind for _, kind, _ in options}
        if "image" in kinds and "perm" not in kinds:
            return _choice_question(problem, answer, options, n_images, task, negative, description)
        if "perm" in kinds and "image" not in kinds:
            opts = tuple(Option(letter, value if kind == "perm" else None) for letter, kind, value in options)
            q = Question("ordering_mcq", problem, n_images, tuple(o.letter for o in opts), options=opts,
                         description=description)
            return _with_truth(q, answer, negative)
        raise ConfigError("the options mix candidate images and permutations; cannot tell the task")
    if task not in (None, "ordering"):
        raise ConfigError(f"task {task!r} needs lettered options, but none were found in the problem text")
    labels = tuple(_LABEL_IMAGE.findall(problem))
    if len(labels) != n_images or len(set(labels)) != n_images:
        labels = tuple(LETTERS[:n_images])
    q = Question("ordering", problem, n_images, labels, description=description)
    return _with_truth(q, answer, negative)


def _choice_question(problem: str, answer: str, options: list, n_images: int, task: str | None,
                     negative: bool | None, description: str | None) -> Question:
    counter = itertools.count()
    opts = tuple(Option(letter, next(counter) if kind == "image" else None) for letter, kind, _ in options)
    n_candidates = sum(kind == "image" for _, kind, _ in options)
    n_context = n_images - n_candidates
    if n_context < 1:
        raise ConfigError(f"{n_candidates} candidate images leave no context image among {n_images}")
    task, steps, target = _choice_steps(problem, n_context, task)
    q = Question(task, problem, n_images, tuple(o.letter for o in opts), options=opts, context_steps=steps,
                 target_step=target, description=description)
    return _with_truth(q, answer, negative)


def _with_truth(question: Question, answer: str, negative: bool | None) -> Question:
    if negative is None:
        negative = question.none_letter is not None and answer == question.none_letter
    return question.with_answer(answer, negative=negative)


# ----------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class EvalRow:
    """One dataset row, images still encoded."""

    id: str
    problem: str
    answer: str
    image_cells: tuple = field(repr=False)
    task: str | None = None
    domain: str = ""
    negative: bool | None = None
    episode_id: str = ""
    root: Path | None = field(default=None, repr=False)

    def question(self) -> Question:
        """The question this row asks, with its ground truth (see :func:`question_from_problem`)."""
        return question_from_problem(self.problem, self.answer, n_images=len(self.image_cells), task=self.task,
                                     negative=self.negative)

    def images(self) -> list:
        """The row's images as RGB PIL images."""
        return [_decode_cell(c, self.root, f"row {self.id} image {i}") for i, c in enumerate(self.image_cells)]


def _decode_cell(cell, root: Path | None, source: str):
    data = cell_bytes(cell, root, source, required=False)
    if data is not None:
        return decode_image(data, source=source)
    if hasattr(cell, "convert"):  # already a PIL image
        return cell.convert("RGB")
    raise FrameError(f"image cell of type {type(cell).__name__} is neither bytes nor a {{bytes, path}} struct",
                     source=source)


def content_id(problem: str, answer: str, cells, root: Path | None) -> str:
    """A stable id from the row's text, answer and image bytes (16 hex digits)."""
    digest = hashlib.sha1(problem.encode() + b"\0" + answer.encode())
    for i, cell in enumerate(cells):
        try:
            data = cell_bytes(cell, root, f"image {i}", required=False)
        except FrameError:  # a missing image file: the row still gets an id, and fails when it is evaluated
            data = None
        digest.update(hashlib.sha1(data if data is not None else repr(cell).encode()).digest())
    return digest.hexdigest()[:16]


class EvalDataset:
    """The rows of a TPRU-layout dataset, in a fixed order; ``len()`` is cheap (metadata only)."""

    def __init__(self, path: str | Path, *, split: str = "auto"):
        self.path = Path(path)
        self.split = split
        #: the budget the frames were stored at (a ``tpru data build``), else ``None`` (see ``stored_budget``)
        self.frames_budget = stored_budget(self.path)
        if not self.path.exists():
            raise ConfigError(f"{str(self.path)!r} does not exist; pass a TPRU parquet file, a folder of them, or a "
                              "folder saved with datasets.save_to_disk")
        self.kind = "datasets" if _is_saved_dataset(self.path) else "parquet"
        if self.kind == "datasets":
            self._ds, self.split = _load_saved(self.path, split)
            self.files: list[Path] = []
        else:
            self.files = _select_files(self.path, split)

    def __len__(self) -> int:
        if self.kind == "datasets":
            return len(self._ds)
        pq = require("pyarrow.parquet", "finetune", what="reading TPRU parquet files")
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    def describe(self) -> dict:
        """Where the rows come from (for the report)."""
        root = self.path if self.path.is_dir() else self.path.parent
        return {"path": str(self.path.resolve()), "kind": self.kind, "split": self.split,
                "files": [str(f.relative_to(root)) for f in self.files], "rows": len(self)}

    def __iter__(self) -> Iterator[EvalRow]:
        seen: dict[str, int] = {}
        for data, n, root in self._batches():
            for i in range(n):
                row = _make_row(data, i, root)
                count = seen.get(row.id, 0) + 1
                seen[row.id] = count
                if count > 1:  # identical rows stay distinct items
                    row = replace(row, id=f"{row.id}~{count}")
                yield row

    def _batches(self):
        if self.kind == "datasets":
            arrow = self._ds.with_format("arrow")
            for start in range(0, len(arrow), 32):
                table = arrow[start:start + 32]
                yield table.to_pydict(), table.num_rows, self.path
            return
        pq = require("pyarrow.parquet", "finetune", what="reading TPRU parquet files")
        for file in self.files:
            parquet = pq.ParquetFile(file)
            names = parquet.schema_arrow.names
            missing = [c for c in ("problem", "images", "answer") if c not in names]
            if missing:
                raise ConfigError(f"{str(file)!r} is not in the TPRU layout: missing column(s) {missing}")
            for batch in parquet.iter_batches(batch_size=32, columns=[c for c in COLUMNS if c in names]):
                yield batch.to_pydict(), batch.num_rows, file.parent


def _make_row(data: dict, i: int, root: Path) -> EvalRow:
    def col(name, default=None):
        values = data.get(name)
        return default if values is None or values[i] is None else values[i]

    problem, answer = str(col("problem", "")), str(col("answer", "")).strip()
    cells = tuple(col("images", []) or [])
    row_id = col("id")
    row_id = str(row_id) if row_id not in (None, "") else content_id(problem, answer, cells, root)
    negative = col("negative")
    return EvalRow(row_id, problem, answer, cells, task=col("task") or None, domain=str(col("domain", "") or ""),
                   negative=None if negative is None else bool(negative),
                   episode_id=str(col("episode_id", "") or ""), root=root)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _load_saved(path: Path, split: str):
    datasets = require("datasets", "finetune", what="reading a dataset saved with save_to_disk")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split == "auto":
            split = next((s for s in SPLIT_NAMES if s in names), names[0])
        if split not in names:
            raise ConfigError(f"split {split!r} is not in {str(path)!r}; it has {names}")
        ds = ds[split]
    elif split not in ("auto", "all"):
        raise ConfigError(f"{str(path)!r} holds one dataset without splits; drop --split {split}")
    for column in ("problem", "images", "answer"):
        if column not in ds.column_names:
            raise ConfigError(f"{str(path)!r} is not in the TPRU layout: no {column!r} column ({ds.column_names})")
    return ds, split


def _split_of(file: Path, root: Path) -> str | None:
    """The split a parquet file belongs to: its folder name or its file-name prefix, when it is a known split."""
    parts = file.relative_to(root).parts
    for part in parts[:-1]:
        if part in SPLIT_NAMES:
            return part
    stem = re.split(r"[-_.]", parts[-1])[0]
    return stem if stem in SPLIT_NAMES else None


def _select_files(path: Path, split: str) -> list[Path]:
    files = parquet_files(path)
    if path.is_file() or split == "all":
        return files
    by_split = {f: _split_of(f, path) for f in files}
    present = sorted({s for s in by_split.values() if s})
    if split == "auto":  # the first held-out split present; training files only when nothing else exists
        split = next((s for s in SPLIT_NAMES if s != "train" and s in present), None)
        if split is None:
            if "train" in present:
                log.warning("%s has no test / validation split: evaluating every file, training data included",
                            path)
            return files
    chosen = [f for f, s in by_split.items() if s == split]
    if not chosen:
        raise ConfigError(f"no parquet files of split {split!r} under {str(path)!r} (splits found: "
                          f"{present or 'none'}); pass --split all to read every file")
    return chosen


def open_dataset(path: str | Path, *, split: str = "auto") -> EvalDataset:
    """Open a TPRU-layout dataset for evaluation.

    Args:
        path: a parquet file, a folder of parquet files, or a ``save_to_disk`` folder.
        split: ``"auto"`` (the test split when there is one, else every file), ``"all"``, or a split name
            (``test``, ``train``...; a sub-folder, a file-name prefix, or a ``DatasetDict`` key).
    """
    return EvalDataset(path, split=split)


__all__ = ["EvalDataset", "EvalRow", "content_id", "open_dataset", "parse_options", "question_from_problem"]
