"""Meta-World expert episodes rendered on CPU: real robot-arm procedures for the three TPRU tasks.

Each of Meta-World's 50 tasks ships a scripted expert (``metaworld.policies.ENV_POLICY_MAP``, ~98% success). An
episode is one expert rollout from a seeded initial state; the frames are ``frames_per_episode`` renders spread
evenly over the rollout, from the state after reset to the first successful state. Only successful rollouts are
kept (failed ones are retried with the next attempt seed, and counted in the log).

How it is rendered (measured facts, see FIELD-NOTES):
- ``MUJOCO_GL=egl`` (set here unless the caller chose another back-end) renders headless on CPU with Mesa.
- The named cameras are mounted upside down: frames are rotated 180 degrees (``frame[::-1, ::-1]``).
- Shadows and reflections are switched off, which lifts 224 px rendering from ~12 to ~50 fps.
- The rollout itself runs without rendering (~3,000 steps/s); the simulator state of every step is recorded and
  only the chosen frames are rendered from it afterwards (identical pixels to rendering online).
- The env is built once per (task, size, camera) and cached (construction costs 1-2 s), and its GL context is
  made current before rendering (several cached envs otherwise render a blank grey frame); the base class takes
  ``render_mode``, ``camera_name`` and ``width/height`` (the goal-observable variants ignore them), then
  ``set_task`` fixes the randomised object and goal positions, which come from this module's seeded RNG.

Sabotage (for checkers that must flag a bad run): ``perturb`` adds Gaussian noise of that standard deviation to
every action's xyz part; ``open_gripper_early`` forces the gripper open once the expert has held it closed for
:data:`GRIP_HOLD_STEPS` steps (tasks whose expert never closes the gripper are unaffected;
``meta["sabotage_applied"]`` says whether it happened). Sabotaged episodes are not filtered by success.

Example:
    >>> from tpru_agent.finetune.sources.metaworld import metaworld_episodes
    >>> ep = next(metaworld_episodes(["drawer-open-v3"], 1, frames_per_episode=8))   # doctest: +SKIP
    >>> ep.description, len(ep.frames), ep.frames[0].size                           # doctest: +SKIP
    ('opening a drawer', 8, (224, 224))
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import pickle
import warnings
import zlib
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

from tpru_agent.errors import ConfigError, close_matches, require
from tpru_agent.finetune.sources.base import Episode

log = logging.getLogger(__name__)

#: One gerund phrase per task, from the task's definition in Meta-World (rendered as "These photos show the
#: process of ..."). Never produced by a model (issue 4).
TASK_SENTENCES: dict[str, str] = {
    "assembly-v3": "picking up a ring and placing it onto a peg",
    "basketball-v3": "picking up a ball and dunking it into a basketball hoop",
    "bin-picking-v3": "picking a cube out of one bin and placing it into the other bin",
    "box-close-v3": "picking up a lid and closing a box with it",
    "button-press-topdown-v3": "pressing a button down from above",
    "button-press-topdown-wall-v3": "reaching past a wall and pressing a button down from above",
    "button-press-v3": "pressing a button on the front of a box",
    "button-press-wall-v3": "reaching past a wall and pressing a button on the front of a box",
    "coffee-button-v3": "pressing the button on a coffee machine",
    "coffee-pull-v3": "pulling a mug out from under a coffee machine",
    "coffee-push-v3": "pushing a mug under a coffee machine",
    "dial-turn-v3": "turning a dial",
    "disassemble-v3": "lifting a ring off a peg",
    "door-close-v3": "closing a door",
    "door-lock-v3": "locking a door by turning its lock",
    "door-open-v3": "opening a door",
    "door-unlock-v3": "unlocking a door by turning its lock",
    "drawer-close-v3": "closing a drawer",
    "drawer-open-v3": "opening a drawer",
    "faucet-close-v3": "turning a faucet off",
    "faucet-open-v3": "turning a faucet on",
    "hammer-v3": "picking up a hammer and hammering a nail into a wall",
    "hand-insert-v3": "moving the gripper down into a hole in the table",
    "handle-press-side-v3": "pressing a handle down from the side",
    "handle-press-v3": "pressing a handle down",
    "handle-pull-side-v3": "pulling a handle up from the side",
    "handle-pull-v3": "pulling a handle up",
    "lever-pull-v3": "pulling a lever",
    "peg-insert-side-v3": "picking up a peg and inserting it sideways into a hole",
    "peg-unplug-side-v3": "unplugging a peg sideways from a hole",
    "pick-out-of-hole-v3": "picking a puck out of a hole",
    "pick-place-v3": "picking up a puck and placing it at a goal",
    "pick-place-wall-v3": "picking up a puck and placing it at a goal behind a wall",
    "plate-slide-back-side-v3": "sliding a plate sideways out of a cabinet",
    "plate-slide-back-v3": "sliding a plate out of a cabinet",
    "plate-slide-side-v3": "sliding a plate sideways into a cabinet",
    "plate-slide-v3": "sliding a plate into a cabinet",
    "push-back-v3": "pulling a puck back to a goal",
    "push-v3": "pushing a puck to a goal",
    "push-wall-v3": "pushing a puck around a wall to a goal",
    "reach-v3": "moving the gripper to a goal position",
    "reach-wall-v3": "moving the gripper past a wall to a goal position",
    "shelf-place-v3": "picking up a puck and placing it on a shelf",
    "soccer-v3": "pushing a ball into a goal",
    "stick-pull-v3": "picking up a stick and pulling a box with it",
    "stick-push-v3": "picking up a stick and pushing a box with it",
    "sweep-into-v3": "sweeping a puck into a hole",
    "sweep-v3": "sweeping a puck off the table",
    "window-close-v3": "sliding a window closed",
    "window-open-v3": "sliding a window open",
}

#: Steps the expert must hold the gripper closed before ``open_gripper_early`` releases it (a grasp is made).
GRIP_HOLD_STEPS = 10
#: Meta-World refuses to step past 500 steps without a reset.
MAX_PATH_LENGTH = 500
#: Attempts per requested episode before giving up on a task (the experts succeed ~98% of the time).
MAX_ATTEMPTS_PER_EPISODE = 5
_ENV_CACHE_SIZE = 4
_ENVS: "OrderedDict[tuple, object]" = OrderedDict()


def task_sentence(task: str) -> str:
    """The description of a Meta-World task (``"drawer-open-v3"`` -> ``"opening a drawer"``)."""
    if task in TASK_SENTENCES:
        return TASK_SENTENCES[task]
    words = task.rsplit("-v", 1)[0].replace("-", " ")
    return f"doing the '{words}' task"


def _import_metaworld():
    # Headless rendering: EGL with the system Mesa; the caller may have chosen osmesa/glfw already.
    os.environ.setdefault("MUJOCO_GL", "egl")
    # Importing triton after MuJoCo has made an EGL context segfaults (Mesa): it comes in later through
    # transformers' generation code (torch._dynamo), e.g. a model loaded after episodes were rendered. Imported
    # first, it is harmless; only where it is installed (torch's CUDA builds bring it).
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
    mw = require("metaworld", "sim", what="Meta-World episodes")
    require("mujoco", "sim", what="Meta-World episodes")
    from metaworld import env_dict
    from metaworld.policies import ENV_POLICY_MAP

    return mw, env_dict, ENV_POLICY_MAP


def _env(task: str, size: int, camera: str):
    """The cached env for a task, built with the renderer settings and shadows/reflections off."""
    import mujoco

    key = (task, size, camera)
    if key in _ENVS:
        _ENVS.move_to_end(key)
        return _ENVS[key]
    _, env_dict, _ = _import_metaworld()
    cls = env_dict.ALL_V3_ENVIRONMENTS[task]
    try:
        env = cls(render_mode="rgb_array", camera_name=camera, width=size, height=size)
    except Exception as exc:  # mujoco raises a bare ValueError for unknown camera names
        raise ConfigError(f"cannot build Meta-World env {task!r} with camera {camera!r}: {exc}; valid cameras "
                          "include 'corner', 'corner2', 'corner3', 'topview', 'behindGripper', 'gripperPOV'") from exc
    viewer = env.mujoco_renderer._get_viewer("rgb_array")
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    if not _ENVS:  # free the GL contexts before interpreter teardown (their __del__ then fails noisily)
        atexit.register(close_envs)
    _ENVS[key] = env
    while len(_ENVS) > _ENV_CACHE_SIZE:
        _, old = _ENVS.popitem(last=False)
        old.close()
    return env


def close_envs() -> None:
    """Close every cached Meta-World env (frees the render contexts)."""
    atexit.unregister(close_envs)
    while _ENVS:
        _, env = _ENVS.popitem()
        env.close()


def _rng(seed: int, task: str, index: int, attempt: int, salt: int) -> np.random.Generator:
    # crc32 rather than hash(): stable across processes, so a seed always gives the same episodes.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(task.encode()), index, attempt, salt]))


def _set_task(env, task: str, rng: np.random.Generator) -> np.ndarray:
    """Draw the object/goal positions the way Meta-World does (its resets reject invalid layouts), then freeze them.

    Sampling the reset space uniformly is not enough: several envs (box-close, assembly...) loop in ``reset``
    until the sampled vector is valid, forever when it is frozen to an invalid one.
    """
    from metaworld import Task

    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    env.seed(int(rng.integers(2**31 - 1)))
    env._set_task_inner()
    env.reset()
    rand_vec = np.array(env._last_rand_vec, dtype=np.float64)
    data = {"rand_vec": rand_vec, "env_cls": type(env), "partially_observable": False}
    env.set_task(Task(env_name=task, data=pickle.dumps(data)))
    return rand_vec


def _rollout(env, policy, rng: np.random.Generator, *, perturb: float, open_gripper_early: bool,
             max_steps: int) -> tuple[list, bool, bool, int]:
    """Run the expert; return the recorded states, success, whether sabotage applied, and the step count."""
    obs, _ = env.reset()
    data = env.data

    def snap():
        return data.qpos.copy(), data.qvel.copy(), data.mocap_pos.copy(), data.mocap_quat.copy()

    states, success, held, released = [snap()], False, 0, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experts warn that their gains exceed the action bounds
        for _ in range(max_steps):
            action = np.asarray(policy.get_action(obs), dtype=np.float64).copy()
            if perturb > 0:
                action[:3] = np.clip(action[:3] + rng.normal(0.0, perturb, 3), -1.0, 1.0)
            if open_gripper_early and not released:
                held = held + 1 if action[3] > 0 else 0
                released = held >= GRIP_HOLD_STEPS
            if released:
                action[3] = -1.0
            obs, _, _, truncated, info = env.step(action)
            states.append(snap())
            if info.get("success"):
                success = True
                break
            if truncated:
                break
    return states, success, released, len(states) - 1


def _render(env, states: list, indices: Sequence[int]) -> tuple:
    import mujoco
    from PIL import Image

    # gymnasium makes a viewer's GL context current only when one env has several viewers; with several cached
    # envs the last-built context stays current and the others render garbage, so make ours current first.
    env.mujoco_renderer._get_viewer("rgb_array").make_context_current()
    frames = []
    for i in indices:
        qpos, qvel, mpos, mquat = states[i]
        env.data.qpos[:], env.data.qvel[:] = qpos, qvel
        env.data.mocap_pos[:], env.data.mocap_quat[:] = mpos, mquat
        mujoco.mj_forward(env.model, env.data)
        # The named cameras are mounted upside down: rotate 180 degrees (a vertical flip alone mirrors the scene).
        frames.append(Image.fromarray(np.ascontiguousarray(env.render()[::-1, ::-1])))
    return tuple(frames)


def even_indices(n_states: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``0..n_states-1``, first and last included (all when fewer)."""
    if n_states <= k:
        return list(range(n_states))
    return sorted({int(round(x)) for x in np.linspace(0, n_states - 1, k)})


def _check(tasks: Sequence[str], episodes_per_task: int, frames_per_episode: int, size: int, perturb: float,
           max_steps: int, env_dict) -> None:
    for task in tasks:
        if task not in env_dict.ALL_V3_ENVIRONMENTS:
            raise ConfigError(f"unknown Meta-World task {task!r}.{close_matches(task, env_dict.ALL_V3_ENVIRONMENTS)} "
                              f"Valid tasks: {', '.join(sorted(env_dict.ALL_V3_ENVIRONMENTS))}")
    if episodes_per_task < 0:
        raise ConfigError(f"episodes_per_task must be >= 0, got {episodes_per_task}")
    if frames_per_episode < 2:
        raise ConfigError(f"frames_per_episode must be >= 2, got {frames_per_episode}")
    if not 32 <= size <= 1024:
        raise ConfigError(f"size must be in 32..1024 px, got {size}")
    if perturb < 0:
        raise ConfigError(f"perturb is a standard deviation and must be >= 0, got {perturb}")
    if not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise ConfigError(f"max_steps must be in 1..{MAX_PATH_LENGTH} (Meta-World's path limit), got {max_steps}")


def metaworld_episodes(tasks: Sequence[str], episodes_per_task: int, *, frames_per_episode: int = 16,
                       size: int = 224, seed: int = 0, camera: str = "corner3", perturb: float = 0.0,
                       open_gripper_early: bool = False, max_steps: int = MAX_PATH_LENGTH) -> Iterator[Episode]:
    """Yield expert episodes of Meta-World tasks, ``episodes_per_task`` each, deterministic for a seed.

    Args:
        tasks: Meta-World v3 task names, e.g. ``["drawer-open-v3", "button-press-v3"]`` (one name: one task).
        episodes_per_task: episodes to yield per task (successful ones unless sabotaged).
        frames_per_episode: frames spread evenly over each rollout (fewer when the rollout is shorter).
        size: square frame size in pixels.
        seed: base seed; episode ``i`` of a task uses its own RNG derived from (seed, task, i, attempt).
        camera: Meta-World camera name.
        perturb: standard deviation of Gaussian noise added to the expert's xyz actions (sabotage).
        open_gripper_early: force the gripper open after a grasp is made (sabotage).
        max_steps: rollout length limit (at most 500).

    Yields:
        :class:`Episode` with domain ``"robot"``, ``task`` the Meta-World name, ``description`` from
        :data:`TASK_SENTENCES`, and ``meta`` holding source, seed, attempt, success, steps, frame steps, camera,
        size, sabotage settings and the randomised object/goal vector.

    Raises:
        ConfigError: unknown task, bad sizes, or a task whose expert keeps failing.
        EngineUnavailableError: ``metaworld`` is not installed (``pip install 'tpru-agent[sim]'``).
    """
    _, env_dict, policy_map = _import_metaworld()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)  # one name is one task, not a list of letters
    _check(tasks, episodes_per_task, frames_per_episode, size, perturb, max_steps, env_dict)
    for task in tasks:
        yield from _task_episodes(task, policy_map[task], episodes_per_task, frames_per_episode=frames_per_episode,
                                  size=size, seed=seed, camera=camera, perturb=perturb,
                                  open_gripper_early=open_gripper_early, max_steps=max_steps)


def _task_episodes(task: str, policy_cls, count: int, *, frames_per_episode: int, size: int, seed: int,
                   camera: str, perturb: float, open_gripper_early: bool, max_steps: int) -> Iterator[Episode]:
    """``count`` episodes of one task (see :func:`metaworld_episodes`): roll out, retry failed experts, render."""
    sabotaged = perturb > 0 or open_gripper_early
    salt = (1 if perturb > 0 else 0) + (2 if open_gripper_early else 0)
    env = _env(task, size, camera)
    policy = policy_cls()
    made, attempt, failures = 0, 0, 0
    while made < count:
        if attempt >= MAX_ATTEMPTS_PER_EPISODE * max(count, 1):
            raise ConfigError(f"the Meta-World expert for {task!r} failed {failures} of {attempt} rollouts "
                              f"(max_steps={max_steps}); raise max_steps or drop the task")
        rng = _rng(seed, task, made, attempt, salt)
        attempt += 1
        rand_vec = _set_task(env, task, rng)
        states, success, applied, steps = _rollout(env, policy, rng, perturb=perturb,
                                                   open_gripper_early=open_gripper_early, max_steps=max_steps)
        if not success and not sabotaged:
            failures += 1
            log.info("Meta-World %s: rollout %d failed after %d steps; retrying", task, attempt, steps)
            continue
        indices = even_indices(len(states), frames_per_episode)
        kind = ("-perturb" if perturb > 0 else "") + ("-gripper" if open_gripper_early else "")
        yield Episode(
            episode_id=f"metaworld/{task}/seed{seed}/ep{made}{kind}",
            frames=_render(env, states, indices),
            description=task_sentence(task),
            domain="robot",
            task=task,
            meta={"source": "metaworld", "seed": seed, "index": made, "attempt": attempt - 1,
                  "success": success, "steps": steps, "frame_steps": indices, "camera": camera, "size": size,
                  "perturb": perturb, "open_gripper_early": open_gripper_early,
                  "sabotage_applied": bool(perturb > 0 or applied), "rand_vec": [float(x) for x in rand_vec]},
        )
        made += 1
    if failures:
        log.warning("Meta-World %s: %d failed expert rollouts skipped (kept only successful ones)", task, failures)


__all__ = ["TASK_SENTENCES", "close_envs", "even_indices", "metaworld_episodes", "task_sentence"]
