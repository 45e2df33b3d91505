"""Simulator episode sources (Meta-World on CPU, MiniWoB++ in system Chromium) and the classic engine on them."""

from __future__ import annotations

import itertools
import random
import shutil

import numpy as np
import pytest

from tpru_agent.engines.base import Request
from tpru_agent.engines.classic import ClassicEngine
from tpru_agent.errors import ConfigError
from tpru_agent.tasks import continuation, next_frame, ordering

pytestmark = pytest.mark.slow


def _arrays(episode) -> list[np.ndarray]:
    return [np.asarray(f) for f in episode.frames]


# ---------------------------------------------------------------------------------------------- Meta-World
@pytest.fixture(scope="module")
def mw():
    pytest.importorskip("metaworld", reason="Meta-World is not installed: pip install 'tpru-agent[sim]'")
    from tpru_agent.finetune.sources import metaworld

    yield metaworld
    metaworld.close_envs()


@pytest.fixture(scope="module")
def drawer(mw):
    return next(mw.metaworld_episodes(["drawer-open-v3"], 1, frames_per_episode=8, size=128, seed=3))


def test_metaworld_expert_episode(mw, drawer):
    assert drawer.domain == "robot" and drawer.task == "drawer-open-v3"
    assert drawer.description == "opening a drawer"
    assert len(drawer) == 8 and all(f.size == (128, 128) and f.mode == "RGB" for f in drawer.frames)
    assert drawer.meta["success"] is True and drawer.meta["frame_steps"][0] == 0
    assert drawer.meta["frame_steps"][-1] == drawer.meta["steps"]
    frames = _arrays(drawer)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1.0   # the scene changed
    assert frames[0].std() > 20                                                  # not a blank render


def test_metaworld_is_deterministic_and_renders_right_after_another_env(mw, drawer):
    # building a second env switches the GL context; the cached drawer env must still render the same pixels
    next(mw.metaworld_episodes(["button-press-v3"], 1, frames_per_episode=2, size=128, seed=0))
    again = next(mw.metaworld_episodes(["drawer-open-v3"], 1, frames_per_episode=8, size=128, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(drawer), _arrays(again)))
    other = next(mw.metaworld_episodes(["drawer-open-v3"], 1, frames_per_episode=8, size=128, seed=4))
    assert other.meta["rand_vec"] != drawer.meta["rand_vec"]


def test_metaworld_sabotage_is_kept_and_recorded(mw):
    ep = next(mw.metaworld_episodes(["pick-place-v3"], 1, frames_per_episode=4, size=96, seed=0,
                                    open_gripper_early=True, max_steps=150))
    assert ep.meta["sabotage_applied"] is True and ep.meta["open_gripper_early"] is True
    assert ep.episode_id.endswith("-gripper") and len(ep) == 4


def test_metaworld_descriptions_cover_every_task(mw):
    from metaworld import env_dict

    assert set(mw.TASK_SENTENCES) == set(env_dict.ALL_V3_ENVIRONMENTS)
    assert mw.task_sentence("drawer-open-v3") == "opening a drawer"
    assert mw.task_sentence("new-task-v9") == "doing the 'new task' task"


@pytest.mark.parametrize("kwargs, match", [
    ({"tasks": ["drawer-opn-v3"]}, "Did you mean 'drawer-open-v3'"),
    ({"frames_per_episode": 1}, "frames_per_episode"),
    ({"max_steps": 501}, "max_steps"),
])
def test_metaworld_bad_arguments(mw, kwargs, match):
    args = {"tasks": ["drawer-open-v3"], "episodes_per_task": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        next(mw.metaworld_episodes(args.pop("tasks"), args.pop("episodes_per_task"), **args))


def test_classic_engine_on_a_real_robot_episode(drawer):
    """Every 4-frame subset of the 8-frame episode, shuffled: the path is found well above chance (2/24 up to
    direction); the direction itself stays a coin flip (a permutation and its reverse score the same)."""
    engine = ClassicEngine()
    q = ordering.build(4)
    rng = random.Random(0)
    hits = 0
    combos = list(itertools.combinations(range(len(drawer)), 4))
    for combo in combos:
        perm = list(range(4))
        rng.shuffle(perm)
        truth = "".join(q.labels[perm.index(k)] for k in range(4))
        request = Request(q, q.problem, tuple(drawer.frames[combo[p]] for p in perm))
        scores = dict(zip(q.answers(), engine.score(request, [continuation(a) for a in q.answers()])))
        best = max(scores, key=scores.get)
        hits += best in (truth, truth[::-1])
        assert scores[truth] == pytest.approx(scores[truth[::-1]])
    assert hits / len(combos) > 0.35            # measured 0.53 for this episode; chance is 0.083
    # next frame: steps 0, 2 and goal 7 given; the true step (frame 4) against frames far off in the episode
    f = drawer.frames
    q = next_frame.build(2, 3, with_goal=True)
    request = Request(q, q.problem, (f[0], f[2], f[7], f[0], f[4], f[7]))
    scores = engine.score(request, [continuation(a) for a in q.answers()])
    assert q.option(q.answers()[int(np.argmax(scores))]).value == 1


# ---------------------------------------------------------------------------------------------- MiniWoB
@pytest.fixture(scope="module")
def mwob():
    pytest.importorskip("miniwob", reason="MiniWoB++ is not installed: pip install 'tpru-agent[sim]'")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install 'tpru-agent[sim]'")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        pytest.skip("system Chromium is not installed: apt-get install -y chromium chromium-driver")
    from tpru_agent.finetune.sources import miniwob

    return miniwob


def test_miniwob_login_episode(mwob):
    eps = list(mwob.miniwob_episodes(["login-user"], 2, seed=0))
    assert len(eps) == 2 and eps[0].episode_id != eps[1].episode_id
    for ep in eps:
        frames = _arrays(ep)
        assert ep.domain == "gui" and ep.task == "login-user" and ep.meta["success"] is True
        assert len(frames) >= 4 and all(f.shape == (420, 320, 3) for f in frames)
        assert ep.meta["utterance"] in ep.description and "logging in" in ep.description
        assert all(f.mean() > 100 for f in frames)                                   # no black frame kept
        assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))      # no repeated frame
        # the black-bordered strip at the bottom means the viewport was too short: the task area is all there
        assert frames[0][-20:].mean() > 200
    again = next(mwob.miniwob_episodes(["login-user"], 1, seed=0))
    assert again.meta["utterance"] == eps[0].meta["utterance"]
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(again), _arrays(eps[0])))


def test_miniwob_wrong_action_is_kept_and_located(mwob):
    ep = next(mwob.miniwob_episodes(["enter-text"], 1, seed=0, wrong_action=True))
    assert ep.meta["success"] is False and ep.meta["wrong_action"] is True
    assert 0 < ep.meta["wrong_frame"] < len(ep)
    assert ep.episode_id.endswith("-wrong")


def test_miniwob_unknown_task(mwob):
    with pytest.raises(ConfigError, match="Did you mean 'login-user'"):
        next(mwob.miniwob_episodes(["login-usr"], 1))


def test_a_model_loads_after_episodes_were_rendered(tmp_path):
    """Importing transformers' generation code (torch._dynamo -> triton) after MuJoCo made its EGL context
    segfaulted; the Meta-World source imports triton first."""
    import subprocess
    import sys

    pytest.importorskip("metaworld")
    pytest.importorskip("transformers")
    code = ("from tpru_agent.finetune.sources.metaworld import metaworld_episodes\n"
            "assert len(list(metaworld_episodes(['reach-v3'], 1, frames_per_episode=4, size=64))) == 1\n"
            "import transformers.generation, torch._dynamo\n"
            "print('loaded after rendering')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "loaded after rendering" in done.stdout, done.stderr[-2000:]
