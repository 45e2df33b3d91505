"""MiniWoB++ GUI episodes in headless system Chromium: scripted agents doing multi-step web tasks.

Each episode is one task instance (seeded): a screenshot of the task area before the first action and after
every action but the last. The last action (Submit / Login) ends the MiniWoB episode and its observation is a
black placeholder, so it is dropped; consecutive identical screenshots (actions with no visible effect) are
dropped too. Episodes with fewer than ``min_frames`` frames are skipped and replaced by the next seed.

Browser: the Debian ``chromium`` and ``chromium-driver`` packages (never a downloaded browser). Their paths go to
``MINIWOB_CHROME_BINARY`` / ``MINIWOB_CHROMEDRIVER`` (set here from ``PATH`` when absent). Chromium runs with
``--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update
--disable-sync --no-first-run`` and a device scale factor of 2, so screenshots are 320x420 px (sharper text than
MiniWoB's own 160x210 capture), and with font hinting, subpixel glyph positioning and LCD text off: without
them, glyph anti-aliasing differed between browser sessions. The text caret is hidden (its blinking made frames
differ) and the focus left by the previous episode is dropped, so a seed gives the same pixels in any session.

Scripted agents (``AGENTS``) read the utterance fields and the DOM that MiniWoB exposes:
- ``click-checkboxes`` / ``click-checkboxes-large``: tick each requested box, then Submit;
- ``enter-text``: click the field, type the text in three chunks, Submit;
- ``enter-password``: click and type the password, click and type it again in the verify field, Submit;
- ``login-user``: click and type the username, click and type the password, Login;
- ``choose-list``: focus the list, press the down arrow until the requested item shows, Submit.

``wrong_action=True`` makes the agent take one wrong step (ticking a box that was not requested, typing a wrong
text, typing the password into the username field, or going one item past the requested one); the episode's
``meta["wrong_frame"]`` is the index of the first frame showing it. Those episodes are kept whatever the reward.

Example:
    >>> from tpru_agent.finetune.sources.miniwob import miniwob_episodes
    >>> ep = next(miniwob_episodes(["login-user"], 1))                 # doctest: +SKIP
    >>> len(ep.frames), ep.frames[0].size                              # doctest: +SKIP
    (5, (320, 420))
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from tpru_agent.errors import ConfigError, EngineUnavailableError, close_matches, require
from tpru_agent.finetune.sources.base import Episode

log = logging.getLogger(__name__)

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--force-device-scale-factor=2",
                  "--font-render-hinting=none", "--disable-font-subpixel-positioning", "--disable-lcd-text")
#: One gerund phrase per task (rendered as "These photos show the process of ..."); the utterance is appended.
TASK_SENTENCES = {
    "click-checkboxes": "ticking the requested checkboxes on a web form and submitting it",
    "click-checkboxes-large": "ticking the requested checkboxes on a web form and submitting it",
    "enter-text": "typing the requested text into a web form field and submitting it",
    "enter-password": "typing a password twice into a web form and submitting it",
    "login-user": "logging in on a web form with a username and a password",
    "choose-list": "choosing an item from a drop-down list on a web form and submitting it",
}
MAX_ATTEMPTS_PER_EPISODE = 10
#: Browser window (CSS px): tall enough that the 160x210 task area is fully inside the viewport.
WINDOW_SIZE = (600, 500)
#: Run after each reset: hide the text caret (its blinking would make frames differ) and drop the focus the last
#: episode's final click left on a button (its focus ring would otherwise show in this episode's first frame).
_PREPARE_PAGE = ("var s = document.createElement('style'); s.id = 'tpru-no-caret';"
                 "s.textContent = '* { caret-color: transparent !important; }';"
                 "if (!document.getElementById('tpru-no-caret')) document.head.appendChild(s);"
                 "if (document.activeElement) document.activeElement.blur();")


@dataclass(frozen=True)
class Step:
    """One agent action: ``click`` an element ref, ``type`` text into the focused element, or press a ``key``."""

    kind: str
    arg: object
    wrong: bool = False


def _elements(obs) -> list[dict]:
    return list(obs["dom_elements"])


def _field(obs, name: str) -> str:
    for key, value in obs["fields"]:
        if key == name:
            return value
    raise ConfigError(f"MiniWoB utterance {obs['utterance']!r} has no field {name!r}")


def _ref(obs, *, tag: str | None = None, id: str | None = None, text: str | None = None) -> int:
    for e in _elements(obs):
        if (tag is None or e["tag"] == tag) and (id is None or e["id"] == id) and (text is None or e["text"] == text):
            return int(e["ref"])
    raise ConfigError(f"no DOM element with tag={tag!r} id={id!r} text={text!r} in MiniWoB page "
                      f"({obs['utterance']!r})")


def _chunks(text: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)]


def _wrong_text(text: str, rng: np.random.Generator) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return "".join(rng.choice(list(alphabet)) for _ in range(max(3, len(text))))


def _agent_checkboxes(obs, rng, wrong, driver) -> list[Step]:
    targets = [v for k, v in obs["fields"] if k.startswith("target")]
    boxes = {}  # label text -> checkbox ref
    elements = _elements(obs)
    for e in elements:
        if e["tag"] == "t":
            box = next((b for b in elements if b["tag"] == "input_checkbox" and b["parent"] == e["parent"]), None)
            if box is not None:
                boxes[e["text"]] = int(box["ref"])
    steps = [Step("click", boxes[t]) for t in targets if t in boxes]
    if wrong:
        others = sorted(set(boxes) - set(targets))
        if not others:
            raise _Retry("every checkbox is requested; no wrong box to tick")
        steps.insert(min(1, len(steps)), Step("click", boxes[others[int(rng.integers(len(others)))]], wrong=True))
    return steps + [Step("click", _ref(obs, tag="button", text="Submit"))]


def _agent_enter_text(obs, rng, wrong, driver) -> list[Step]:
    target = _field(obs, "target")
    text = _wrong_text(target, rng) if wrong else target
    steps = [Step("click", _ref(obs, id="tt"))]
    steps += [Step("type", chunk, wrong=wrong and i == 0) for i, chunk in enumerate(_chunks(text))]
    return steps + [Step("click", _ref(obs, id="subbtn"))]


def _agent_enter_password(obs, rng, wrong, driver) -> list[Step]:
    target = _field(obs, "target")
    return [Step("click", _ref(obs, id="password")), Step("type", target),
            Step("click", _ref(obs, id="verify")),
            Step("type", _wrong_text(target, rng) if wrong else target, wrong=wrong),
            Step("click", _ref(obs, id="subbtn"))]


def _agent_login(obs, rng, wrong, driver) -> list[Step]:
    user, password = _field(obs, "username"), _field(obs, "password")
    if wrong:  # the password typed into the username field
        return [Step("click", _ref(obs, id="username")), Step("type", password, wrong=True),
                Step("click", _ref(obs, id="password")), Step("type", password),
                Step("click", _ref(obs, tag="button", text="Login"))]
    return [Step("click", _ref(obs, id="username")), Step("type", user),
            Step("click", _ref(obs, id="password")), Step("type", password),
            Step("click", _ref(obs, tag="button", text="Login"))]


def _agent_choose_list(obs, rng, wrong, driver) -> list[Step]:
    target = _field(obs, "target")
    items, selected = driver.execute_script(
        "var s = document.querySelector('#area select');"
        "return [Array.from(s.options).map(o => o.text), s.selectedIndex];")
    if target not in items:
        raise ConfigError(f"choose-list item {target!r} is not in the list {items}")
    presses = items.index(target) - selected
    if presses < 1 or (wrong and items.index(target) + 1 >= len(items)):
        raise _Retry("the requested item needs no key press (or has no item after it)")
    steps = [Step("focus", _ref(obs, tag="select"))]
    steps += [Step("key", "<ArrowDown>") for _ in range(presses)]
    if wrong:
        steps.append(Step("key", "<ArrowDown>", wrong=True))
    return steps + [Step("click", _ref(obs, tag="button", text="Submit"))]


AGENTS: dict[str, Callable] = {
    "click-checkboxes": _agent_checkboxes,
    "click-checkboxes-large": _agent_checkboxes,
    "enter-text": _agent_enter_text,
    "enter-password": _agent_enter_password,
    "login-user": _agent_login,
    "choose-list": _agent_choose_list,
}


class _Retry(Exception):
    """This task instance cannot give the requested kind of episode; try the next seed."""


def _browser_paths() -> tuple[str, str]:
    binary = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver")
    if not binary or not driver:
        raise EngineUnavailableError(
            "MiniWoB episodes need the system Chromium and its driver, which were not found "
            f"(chromium: {binary or 'missing'}, chromedriver: {driver or 'missing'}). On Debian/Ubuntu: "
            "apt-get install -y chromium chromium-driver (or set MINIWOB_CHROME_BINARY and MINIWOB_CHROMEDRIVER)")
    return binary, driver


def _make_env(task: str):
    """A MiniWoB environment whose Chromium starts with this module's flags."""
    require("miniwob", "sim", what="MiniWoB episodes")
    require("selenium", "sim", what="MiniWoB episodes")
    from miniwob.environment import MiniWoBEnvironment
    from miniwob.selenium_instance import SeleniumInstance
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.wait import WebDriverWait

    binary, driver_path = _browser_paths()
    os.environ["MINIWOB_CHROME_BINARY"], os.environ["MINIWOB_CHROMEDRIVER"] = binary, driver_path

    class _Instance(SeleniumInstance):
        def create_driver(self):  # MiniWoB's own, with our flags (it offers no hook for them)
            options = webdriver.ChromeOptions()
            for flag in CHROMIUM_FLAGS:
                options.add_argument(flag)
            options.binary_location = binary
            self.driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
            self.driver.implicitly_wait(5)
            # The default headless window is too short for the 210 px task area: the bottom came out black.
            self.driver.set_window_size(*WINDOW_SIZE)
            self.driver.get(self.url)
            WebDriverWait(self.driver, 10).until(EC.element_to_be_clickable((By.ID, self.SYNC_SCREEN_ID)))
            self.inner_width, self.inner_height = self.driver.execute_script(
                "return [window.innerWidth, window.innerHeight];")

    class _Env(MiniWoBEnvironment):
        def _hard_reset_instance(self):
            if getattr(self, "instance", None):
                self.instance.close()
            self.instance = _Instance(index=0, **self.instance_kwargs)
            self.instance.start()
            self.instance.wait()

    try:
        return _Env(subdomain=task)
    except Exception as exc:
        raise EngineUnavailableError(f"Chromium could not start for MiniWoB task {task!r} "
                                     f"({binary}, {driver_path}): {exc}") from exc


def _screenshot(instance):
    """The task area (160x210 CSS px) at the device scale factor, as a PIL RGB image."""
    from PIL import Image

    img = Image.open(io.BytesIO(instance.driver.get_screenshot_as_png())).convert("RGB")
    sx, sy = img.width / instance.inner_width, img.height / instance.inner_height
    return img.crop((0, 0, round(instance.task_width * sx), round(instance.task_height * sy)))


def _act(env, step: Step):
    from miniwob.action import ActionTypes

    if step.kind == "click":
        action = env.create_action(ActionTypes.CLICK_ELEMENT, ref=step.arg)
    elif step.kind == "focus":
        action = env.create_action(ActionTypes.FOCUS_ELEMENT_AND_TYPE_TEXT, ref=step.arg, text="")
    elif step.kind == "type":
        action = env.create_action(ActionTypes.TYPE_TEXT, text=step.arg)
    else:
        action = env.create_action(ActionTypes.PRESS_KEY, key=env.action_space_config.allowed_keys.index(step.arg))
    return env.step(action)


def _run_episode(env, task: str, episode_seed: int, rng, wrong: bool):
    obs, _ = env.reset(seed=episode_seed, options={"record_screenshots": False})
    utterance = obs["utterance"]
    driver = env.instance.driver
    driver.execute_script(_PREPARE_PAGE)
    steps = AGENTS[task](obs, rng, wrong, driver)
    frames, wrong_frame, reward, done = [_screenshot(env.instance)], None, 0.0, False
    for step in steps:
        obs, _, done, _, info = _act(env, step)
        reward = float(info.get("raw_reward", 0.0))  # without MiniWoB's time discount; 1.0 = fully right
        if done:  # MiniWoB's observation after the final action is a black placeholder: nothing to keep
            break
        shot = _screenshot(env.instance)
        if np.array_equal(np.asarray(shot), np.asarray(frames[-1])):
            continue  # no visible change
        frames.append(shot)
        if step.wrong and wrong_frame is None:
            wrong_frame = len(frames) - 1
    return frames, utterance, float(reward), done, wrong_frame, steps


def miniwob_episodes(tasks: Sequence[str], episodes_per_task: int, *, seed: int = 0, wrong_action: bool = False,
                     min_frames: int = 4) -> Iterator[Episode]:
    """Yield scripted MiniWoB++ episodes, ``episodes_per_task`` per task, deterministic for a seed.

    Args:
        tasks: task names from :data:`AGENTS`, e.g. ``["login-user", "click-checkboxes"]``.
        episodes_per_task: episodes to yield per task.
        seed: base seed; each task instance gets its own MiniWoB seed derived from (seed, task, attempt).
        wrong_action: take one wrong step in each episode (see the module docstring).
        min_frames: skip task instances whose episode would have fewer frames (the TPRU tasks use 4).

    Yields:
        :class:`Episode` with domain ``"gui"``, ``task`` the MiniWoB name, ``description`` the task sentence
        plus the utterance, and ``meta`` holding source, seed, MiniWoB seed, utterance, reward, success,
        wrong_action and wrong_frame.

    Raises:
        ConfigError: unknown task, or a task that keeps giving too-short episodes.
        EngineUnavailableError: miniwob/selenium missing, or Chromium not installed or not starting.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)  # one name is one task, not a list of letters
    for task in tasks:
        if task not in AGENTS:
            raise ConfigError(f"no scripted MiniWoB agent for {task!r}.{close_matches(task, AGENTS)} "
                              f"Supported tasks: {', '.join(AGENTS)}")
    if episodes_per_task < 0 or min_frames < 1:
        raise ConfigError(f"episodes_per_task must be >= 0 and min_frames >= 1, got {episodes_per_task}, {min_frames}")
    for task in tasks:
        if episodes_per_task == 0:
            continue
        env = _make_env(task)
        try:
            yield from _task_episodes(env, task, episodes_per_task, seed, wrong_action, min_frames)
        finally:
            env.close()


def _task_episodes(env, task, episodes_per_task, seed, wrong_action, min_frames) -> Iterator[Episode]:
    made, attempt, skipped = 0, 0, 0
    while made < episodes_per_task:
        if attempt >= MAX_ATTEMPTS_PER_EPISODE * episodes_per_task:
            raise ConfigError(f"MiniWoB {task!r}: {skipped} of {attempt} task instances were unusable (shorter "
                              f"than min_frames={min_frames}, failed, or without a wrong step); lower min_frames")
        episode_seed = (seed * 1_000_003 + zlib.crc32(task.encode()) + attempt * 7919) % 2**31
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(task.encode()), attempt]))
        attempt += 1
        try:
            frames, utterance, reward, done, wrong_frame, steps = _run_episode(env, task, episode_seed, rng,
                                                                               wrong_action)
        except _Retry as why:
            skipped += 1
            log.info("MiniWoB %s seed %d skipped: %s", task, episode_seed, why)
            continue
        success = done and reward >= 1.0  # some tasks give partial credit (checkboxes: share of right boxes)
        # a clean episode must succeed; a wrong-action episode must show its wrong step
        usable = len(frames) >= min_frames and (wrong_frame is not None if wrong_action else success)
        if not usable:
            skipped += 1
            log.info("MiniWoB %s seed %d skipped: %d frames, reward %.2f", task, episode_seed, len(frames), reward)
            continue
        yield Episode(
            episode_id=f"miniwob/{task}/seed{seed}/ep{made}{'-wrong' if wrong_action else ''}",
            frames=tuple(frames),
            description=f'{TASK_SENTENCES[task]} (instruction: "{utterance}")',
            domain="gui",
            task=task,
            meta={"source": "miniwob", "seed": seed, "index": made, "miniwob_seed": episode_seed,
                  "utterance": utterance, "reward": reward, "success": success, "actions": len(steps),
                  "wrong_action": wrong_action, "wrong_frame": wrong_frame},
        )
        made += 1
    if skipped:
        log.info("MiniWoB %s: %d task instances skipped", task, skipped)


__all__ = ["AGENTS", "CHROMIUM_FLAGS", "TASK_SENTENCES", "miniwob_episodes"]
