"""``--source KIND:ARGS`` specs -> work units -> episodes.

A spec is ``KIND:`` followed by comma-separated items; the first item may be a bare path, the others are
``key=value`` (``+`` joins list items, numbers and ``true``/``false`` are parsed)::

    frames:runs/lego,domain=lego,max_frames=24
    video:clips/,mode=scenes,frames=12,description=assembling a LEGO car
    lerobot:~/data/aloha,camera=observation.images.top,episodes=0-49,frames=16
    metaworld:tasks=drawer-open-v3+door-open-v3,episodes=20
    miniwob:tasks=click-checkboxes+enter-text,episodes=30

A spec expands into *units*: small, independent, picklable pieces of work (a few episode folders, a few videos, a
few LeRobot episodes, one simulator task). Units run in worker processes and each one's episodes are cached on
disk, which is what makes a build resumable and parallel. Values cannot contain commas (set such descriptions in a
``meta.json`` or a video's sidecar instead).

Example:
    >>> spec = parse_spec("metaworld:tasks=drawer-open-v3+door-open-v3,episodes=2")
    >>> spec.kind, spec.args["tasks"], spec.args["episodes"]
    ('metaworld', ['drawer-open-v3', 'door-open-v3'], 2)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

from tpru_agent.errors import ConfigError, close_matches
from tpru_agent.finetune.sources.base import Episode
from tpru_agent.finetune.sources.common import SkipFn

#: kind -> (module, function, the key a bare first item stands for, the keys the spec accepts).
KINDS: dict[str, tuple[str, str, str | None, tuple[str, ...]]] = {
    "frames": ("folders", "folder_episodes", "path",
               ("path", "domain", "description", "task", "max_frames", "min_frames")),
    "video": ("video", "video_episodes", "path",
              ("path", "frames", "mode", "oversample", "domain", "description", "task", "min_frames", "near_dup")),
    "lerobot": ("lerobot", "lerobot_episodes", "path",
                ("path", "camera", "episodes", "frames", "domain", "min_frames")),
    "metaworld": ("metaworld", "metaworld_episodes", None, ()),
    "miniwob": ("miniwob", "miniwob_episodes", None, ()),
}
SIMULATORS = ("metaworld", "miniwob")
#: Keys whose values stay strings (a description such as "2 cups" is not a number).
TEXT_KEYS = ("path", "description", "task", "domain", "camera")
#: Spec keys of simulator sources that are spelled differently in their functions' signatures.
SIM_ALIASES = {"episodes": "episodes_per_task", "frames": "frames_per_episode"}
SIM_ALIASES_INV = {v: k for k, v in SIM_ALIASES.items()}
#: Episodes (folders, videos, LeRobot episodes) per unit: small enough to resume cheaply, large enough that a
#: big source does not become thousands of tiny cache files.
PER_UNIT = {"frames": 8, "video": 4, "lerobot": 8}


@dataclass(frozen=True)
class SourceSpec:
    """One parsed ``--source`` value."""

    text: str
    kind: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """One independent piece of a source: which function to call, with which arguments (all picklable)."""

    source: int
    index: int
    kind: str
    kwargs: dict = field(hash=False)

    @property
    def key(self) -> str:
        """Stable file-name-safe id, e.g. ``s01-u00007``."""
        return f"s{self.source:02d}-u{self.index:05d}"


def _value(text: str):
    if "+" in text:
        return [_value(part) for part in text.split("+") if part]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str) -> SourceSpec:
    """Parse ``KIND:ARGS``.

    Raises:
        ConfigError: no kind, an unknown kind or key (with a close match), a repeated key, a missing path.
    """
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep or not kind:
        raise ConfigError(f"source {text!r} has no kind; write KIND:ARGS with KIND one of {sorted(KINDS)}, "
                          "e.g. frames:runs/ or metaworld:tasks=drawer-open-v3,episodes=10")
    if kind not in KINDS:
        raise ConfigError(f"unknown source kind {kind!r} in {text!r}; kinds: {sorted(KINDS)}."
                          + close_matches(kind, KINDS))
    _, _, positional, allowed = KINDS[kind]
    args: dict = {}
    for n, item in enumerate(part for part in rest.split(",") if part.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            if n == 0 and positional:
                args[positional] = item.strip()
                continue
            raise ConfigError(f"source {text!r}: {item!r} is not key=value"
                              + (f" (only the first item may be a bare {positional})" if positional else ""))
        key = key.strip()
        if key in args:
            raise ConfigError(f"source {text!r} sets {key!r} twice")
        if allowed and key not in allowed:
            raise ConfigError(f"source {text!r}: unknown key {key!r}; {kind} accepts {list(allowed)}."
                              + close_matches(key, allowed))
        args[key] = value.strip() if key in TEXT_KEYS else _value(value.strip())
    if positional and "path" not in args:
        raise ConfigError(f"source {text!r} names no folder; write {kind}:PATH[,key=value...]")
    if kind in SIMULATORS and "tasks" not in args:
        raise ConfigError(f"source {text!r} names no tasks; write {kind}:tasks=NAME+NAME,episodes=N")
    return SourceSpec(text, kind, args)


def _function(kind: str):
    module_name, func_name, _, _ = KINDS[kind]
    try:
        module = importlib.import_module(f"{__package__}.{module_name}")
    except ImportError as exc:
        raise ConfigError(f"the {kind} source cannot be imported ({exc}); install its extra "
                          "(pip install 'tpru-agent[sim]') or drop the source") from exc
    return module, getattr(module, func_name)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _episode_range(value) -> list[int] | None:
    """``5`` -> [5]; ``"0-9"`` -> 0..9; ``[1, 4]`` -> [1, 4]."""
    if value is None:
        return None
    if isinstance(value, list):
        return [i for v in value for i in _episode_range(v)]
    if isinstance(value, int):
        return [value]
    low, dash, high = str(value).partition("-")
    if dash and low.isdigit() and high.isdigit() and int(low) <= int(high):
        return list(range(int(low), int(high) + 1))
    raise ConfigError(f"lerobot episodes must look like 7, 0-49 or 1+4+9, got {value!r}")


def _sim_kwargs(spec: SourceSpec, func, seed: int) -> dict:
    params = inspect.signature(func).parameters
    kwargs = {SIM_ALIASES.get(k, k): v for k, v in spec.args.items()}
    kwargs.setdefault("seed", seed)
    kwargs.setdefault("episodes_per_task", 10)
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        accepted = [SIM_ALIASES_INV.get(p, p) for p in params if p not in ("on_skip",)]
        raise ConfigError(f"source {spec.text!r}: unknown key {unknown[0]!r}; {spec.kind} accepts {accepted}."
                          + close_matches(unknown[0], accepted))
    return kwargs



def plan_units(spec: SourceSpec, source: int, *, seed: int = 0) -> list[Unit]:
    """Split a source into units (reads only listings and metadata, never frames).

    Raises:
        ConfigError: the source's folder, files or metadata are missing or malformed.
    """
    args = dict(spec.args)
    if spec.kind == "frames":
        from tpru_agent.finetune.sources.folders import list_episodes

        names = list_episodes(args["path"])
        if names == ["."]:
            raise ConfigError(
                f"source {spec.text!r}: {str(args['path'])!r} holds images, not episode folders. A build takes a "
                "folder of episode folders (DIR/episode_1/*.png, DIR/episode_2/*.png ...): questions need other "
                "episodes for distractors and a test split. For this one episode, move its images into a "
                "subfolder (DIR/episode_1/) and add more episodes beside it")
        root = args.pop("path")
        return [Unit(source, i, "frames", {"root": root, "episodes": chunk, **args})
                for i, chunk in enumerate(_chunks(names, PER_UNIT["frames"]))]
    if spec.kind == "video":
        from tpru_agent.finetune.sources.video import list_videos

        videos = [str(v) for v in list_videos(args.pop("path"))]
        return [Unit(source, i, "video", {"paths": chunk, **args})
                for i, chunk in enumerate(_chunks(videos, PER_UNIT["video"]))]
    if spec.kind == "lerobot":
        from tpru_agent.finetune.sources.lerobot import LeRobotLayout

        layout = LeRobotLayout(args["path"])
        layout.camera(args.get("camera"))
        wanted = _episode_range(args.pop("episodes", None))
        indices = sorted(layout.episodes) if wanted is None else wanted
        missing = [i for i in indices if i not in layout.episodes]
        if missing:
            raise ConfigError(f"source {spec.text!r}: episodes {missing[:5]} are not in the dataset "
                              f"({len(layout.episodes)} episodes)")
        root = args.pop("path")
        return [Unit(source, i, "lerobot", {"root": root, "episodes": chunk, **args})
                for i, chunk in enumerate(_chunks(indices, PER_UNIT["lerobot"]))]
    module, func = _function(spec.kind)
    kwargs = _sim_kwargs(spec, func, seed)
    tasks = kwargs.pop("tasks")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if tasks == ["all"]:
        known = getattr(module, "AGENTS", None) or getattr(module, "TASK_SENTENCES", None)
        if not known:
            raise ConfigError(f"source {spec.text!r}: {spec.kind} does not list its tasks; name them with tasks=a+b")
        tasks = sorted(known)
    # One unit per task: the simulator functions derive each episode's RNG from (seed, task, index), so a task
    # rendered alone gives the same episodes as within a list, and tasks render in parallel workers.
    return [Unit(source, i, spec.kind, {"tasks": [task], **kwargs}) for i, task in enumerate(tasks)]


def run_unit(unit: Unit, on_skip: SkipFn | None = None) -> Iterator[Episode]:
    """The episodes of one unit, in order (each drop reported to ``on_skip``)."""
    if unit.kind == "frames":
        from tpru_agent.finetune.sources.folders import folder_episodes

        return folder_episodes(**unit.kwargs, on_skip=on_skip)
    if unit.kind == "video":
        from tpru_agent.finetune.sources.video import video_episodes

        return video_episodes(**unit.kwargs, on_skip=on_skip)
    if unit.kind == "lerobot":
        from tpru_agent.finetune.sources.lerobot import lerobot_episodes

        return lerobot_episodes(**unit.kwargs, on_skip=on_skip)
    _, func = _function(unit.kind)
    kwargs = dict(unit.kwargs)
    if "on_skip" in inspect.signature(func).parameters:
        kwargs["on_skip"] = on_skip
    return func(**kwargs)
