"""Episode sources: spec parsing, frame folders, videos, LeRobot v2.1 / v3.0 layouts written here."""

from __future__ import annotations

import json

import pytest
from episode_data import decode, frame, palette, same_color, write_folders, write_lerobot, write_video

from tpru_agent.errors import ConfigError
from tpru_agent.finetune.sources.folders import folder_episodes, list_episodes
from tpru_agent.finetune.sources.lerobot import lerobot_episodes
from tpru_agent.finetune.sources.registry import parse_spec, plan_units, run_unit
from tpru_agent.finetune.sources.video import video_episodes
from tpru_agent.sizing import TRAINED_FACTOR, TRAINED_MAX, TRAINED_MIN

COLORS = palette(8)


def _in_budget(img) -> bool:
    w, h = img.size
    return TRAINED_MIN <= w * h <= TRAINED_MAX and w % TRAINED_FACTOR == 0 and h % TRAINED_FACTOR == 0


# ----------------------------------------------------------------------------------------------- spec parsing
@pytest.mark.parametrize("text, kind, args", [
    ("frames:runs/lego", "frames", {"path": "runs/lego"}),
    ("frames:runs,domain=lego,max_frames=24", "frames", {"path": "runs", "domain": "lego", "max_frames": 24}),
    ("FRAMES: runs ", "frames", {"path": "runs"}),
    ("video:clips,mode=scenes,frames=12", "video", {"path": "clips", "mode": "scenes", "frames": 12}),
    ("video:c,description=open the box", "video", {"path": "c", "description": "open the box"}),
    ("lerobot:/d/aloha,camera=observation.images.top,episodes=0-9", "lerobot",
     {"path": "/d/aloha", "camera": "observation.images.top", "episodes": "0-9"}),
    ("metaworld:tasks=drawer-open-v3+door-open-v3,episodes=20", "metaworld",
     {"tasks": ["drawer-open-v3", "door-open-v3"], "episodes": 20}),
    ("miniwob:tasks=login-user,episodes=3,seed=7", "miniwob", {"tasks": "login-user", "episodes": 3, "seed": 7}),
])
def test_parse_spec(text, kind, args):
    spec = parse_spec(text)
    assert (spec.kind, spec.args) == (kind, args)


@pytest.mark.parametrize("text, message", [
    ("runs/lego", "has no kind"),
    ("frame:runs", "Did you mean 'frames'"),
    ("videos:x", "Did you mean 'video'"),
    ("frames:runs,domian=lego", "Did you mean 'domain'"),
    ("frames:runs,domain=a,domain=b", "twice"),
    ("frames:domain=lego", "names no folder"),
    ("frames:a,b", "not key=value"),
    ("metaworld:episodes=3", "names no tasks"),
])
def test_parse_spec_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_simulator_keys_are_checked_against_the_source_signature():
    pytest.importorskip("metaworld")
    with pytest.raises(ConfigError, match="Did you mean 'frames'"):
        plan_units(parse_spec("metaworld:tasks=drawer-open-v3,episodes=1,framez=4"), 0)
    units = plan_units(parse_spec("metaworld:tasks=drawer-open-v3+door-open-v3,episodes=2,frames=6"), 3, seed=5)
    assert [u.kwargs["tasks"] for u in units] == [["drawer-open-v3"], ["door-open-v3"]]
    assert units[0].kwargs["episodes_per_task"] == 2 and units[0].kwargs["frames_per_episode"] == 6
    assert units[0].kwargs["seed"] == 5 and units[1].key == "s03-u00001"


# ----------------------------------------------------------------------------------------------- folders
def test_folder_episodes_read_meta_order_and_budget(tmp_path):
    write_folders(tmp_path, [
        {"name": "ep2", "color": COLORS[0], "frames": 12, "description": "open the drawer", "task": "drawer"},
        {"name": "ep10", "color": COLORS[1], "frames": 6},
    ])
    (tmp_path / "meta.json").write_text(json.dumps({"domain": "lego", "description": "stack bricks"}))
    assert list_episodes(tmp_path) == ["ep2", "ep10"]
    eps = list(folder_episodes(tmp_path, max_frames=8))
    assert [e.episode_id for e in eps] == [f"{tmp_path.name}/ep2", f"{tmp_path.name}/ep10"]
    first, second = eps
    assert (first.description, first.domain, first.task) == ("open the drawer", "lego", "drawer")
    assert (second.description, second.domain, second.task) == ("stack bricks", "lego", "stack bricks")
    assert len(first) == 8 and len(second) == 6
    # natural order (frame_2 before frame_10) and even subsampling: first and last frame kept, strictly increasing
    indices = [decode(f, 12)[1] for f in first.frames]
    assert indices[0] == 0 and indices[-1] == 11 and indices == sorted(set(indices))
    assert all(_in_budget(f) for f in first.frames)
    assert all(same_color(decode(f, 6)[0], COLORS[1]) for f in second.frames)


def test_folder_skips_are_reported_with_reasons(tmp_path):
    write_folders(tmp_path, [{"name": "short", "color": COLORS[0], "frames": 3},
                             {"name": "broken", "color": COLORS[1], "frames": 5},
                             {"name": "good", "color": COLORS[2], "frames": 5}])
    (tmp_path / "broken" / "frame_2.png").write_bytes(b"not a png")
    skips = []
    eps = list(folder_episodes(tmp_path, on_skip=lambda e, r: skips.append((e, r))))
    assert [e.episode_id.split("/")[-1] for e in eps] == ["good"]
    reasons = dict((e.split("/")[-1], r) for e, r in skips)
    assert reasons["short"].startswith("too few frames: 3")
    assert reasons["broken"].startswith("unreadable frame") and "frame_2.png" in reasons["broken"]


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        list(folder_episodes(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no episode folders and no images"):
        list_episodes(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    frame(COLORS[0], 0, 4).save(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "meta.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        list(folder_episodes(tmp_path / "bad", min_frames=1))
    assert list_episodes(tmp_path / "bad") == ["."]   # a folder of images is one episode


# ----------------------------------------------------------------------------------------------- videos
def _clip(color, n=40, hold=0):
    """n moving frames, each shown ``hold + 1`` times (held frames are exact duplicates)."""
    return [frame(color, i, n) for i in range(n) for _ in range(hold + 1)]


def test_video_even_sampling_drops_near_duplicates(tmp_path):
    write_video(tmp_path / "clips" / "a.mp4", _clip(COLORS[0], n=12, hold=4))       # 60 frames, 12 distinct
    (tmp_path / "clips" / "a.json").write_text(json.dumps({"description": "slide the block", "domain": "toy"}))
    write_video(tmp_path / "clips" / "b.mp4", [frame(COLORS[1], 0, 8)] * 30)       # static: one distinct frame
    skips = []
    eps = list(video_episodes(tmp_path / "clips", frames=8, on_skip=lambda e, r: skips.append((e, r))))
    assert len(eps) == 1 and eps[0].description == "slide the block" and eps[0].domain == "toy"
    indices = [decode(f, 12)[1] for f in eps[0].frames]
    assert len(indices) == 8 and indices == sorted(set(indices)), indices   # no repeated step
    assert all(_in_budget(f) for f in eps[0].frames)
    assert skips and skips[0][0].endswith("b") and skips[0][1].startswith("too few distinct frames")


def test_video_scene_mode_finds_the_cuts(tmp_path):
    scenes = [COLORS[2], COLORS[3], COLORS[4], COLORS[5]]
    images = [frame(c, 0, 2) for c in scenes for k in range(10)]           # 4 static scenes of 10 frames
    write_video(tmp_path / "cut.mp4", images)
    (ep,) = video_episodes(tmp_path / "cut.mp4", frames=4, mode="scenes", oversample=10, description="four scenes")
    colors = [decode(f, 2)[0] for f in ep.frames]
    assert len(colors) == 4
    assert all(same_color(c, s, tol=30) for c, s in zip(colors, scenes)), (colors, scenes)
    with pytest.raises(ConfigError, match="mode"):
        list(video_episodes(tmp_path / "cut.mp4", mode="random"))


# ----------------------------------------------------------------------------------------------- LeRobot
EPISODES = [{"color": COLORS[0], "frames": 12, "task": "pick up the cube"},
            {"color": COLORS[1], "frames": 9, "task": "open the drawer"},
            {"color": COLORS[2], "frames": 15, "task": "pick up the cube"}]


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_lerobot_layouts_and_camera_choice(tmp_path, version):
    cameras = {"observation.images.front": "video", "observation.images.wrist": "video"}
    write_lerobot(tmp_path / "ds", version, EPISODES, cameras)
    eps = list(lerobot_episodes(tmp_path / "ds", frames=6))
    assert [e.description for e in eps] == [e["task"] for e in EPISODES]
    assert [e.meta["camera"] for e in eps] == ["observation.images.front"] * 3
    for ep, src in zip(eps, EPISODES):
        decoded = [decode(f, src["frames"]) for f in ep.frames]
        assert all(same_color(c, src["color"]) for c, _ in decoded), (version, decoded)   # no bleed across episodes
        steps = [i for _, i in decoded]
        assert steps[0] == 0 and steps[-1] == src["frames"] - 1 and steps == sorted(steps), steps
        assert all(_in_budget(f) for f in ep.frames) and ep.domain == "robot"
    wrist = list(lerobot_episodes(tmp_path / "ds", camera="observation.images.wrist", episodes=[1], frames=4))
    assert len(wrist) == 1 and wrist[0].meta["episode_index"] == 1
    inverted = tuple(255 - v for v in EPISODES[1]["color"])
    assert same_color(decode(wrist[0].frames[0], 9)[0], inverted)
    with pytest.raises(ConfigError, match="Did you mean 'observation.images.front'"):
        list(lerobot_episodes(tmp_path / "ds", camera="observation.images.frnt"))


def test_lerobot_image_camera_and_units(tmp_path):
    write_lerobot(tmp_path / "ds", "v3.0", EPISODES, {"observation.images.cam": "image"})
    units = plan_units(parse_spec(f"lerobot:{tmp_path / 'ds'},episodes=1-2,frames=5"), 0)
    assert len(units) == 1 and units[0].kwargs["episodes"] == [1, 2]
    eps = list(run_unit(units[0]))
    assert [len(e) for e in eps] == [5, 5]
    assert same_color(decode(eps[1].frames[-1], 15)[0], EPISODES[2]["color"])
    assert decode(eps[1].frames[-1], 15)[1] == 14


def test_lerobot_bad_metadata_and_missing_files(tmp_path):
    write_lerobot(tmp_path / "ds", "v2.1", EPISODES, {"observation.images.front": "video"})
    (tmp_path / "ds" / "videos" / "chunk-000" / "observation.images.front" / "episode_000001.mp4").unlink()
    skips = []
    eps = list(lerobot_episodes(tmp_path / "ds", on_skip=lambda e, r: skips.append((e, r))))
    assert len(eps) == 2 and len(skips) == 1
    assert skips[0][0].endswith("episode_000001") and "missing" in skips[0][1]
    with pytest.raises(ConfigError, match="0-49"):
        plan_units(parse_spec(f"lerobot:{tmp_path / 'ds'},episodes=x"), 0)
    with pytest.raises(ConfigError, match=r"episodes \[7\] are not in"):
        plan_units(parse_spec(f"lerobot:{tmp_path / 'ds'},episodes=7"), 0)
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    del info["fps"]
    (tmp_path / "ds" / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="lacks the key 'fps'"):
        list(lerobot_episodes(tmp_path / "ds"))
    with pytest.raises(ConfigError, match="no meta/info.json"):
        list(lerobot_episodes(tmp_path))
