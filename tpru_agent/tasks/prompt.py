"""The answer-rules preamble wrapped around every question.

The default wording is this project's own statement of the TPRU answer contract. It carries no example answer of
its own: an ordering question already shows one (``for example DCBA``), and a second, different one in the same
prompt (it once said ``BDAC``) left the model two examples to copy (issue 13). ``template=`` takes a Jinja file
instead (rendered with ``content`` = the question text), so a user can pass the TPRU authors' own template and
reproduce the paper's setup exactly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tpru_agent.errors import ConfigError
from tpru_agent.tasks.question import load_template

DEFAULT_PREAMBLE = """\
The task below is about a set of images from one procedure.

{{ content | trim }}

Look at every image and check it against the text before answering. Rules for the answer:
- Ordering question (images labelled A, B, C, ...): answer with the labels in the order the events happen, \
as one string without spaces, written like the example in the question.
- Multiple-choice question (options A, B, C, ...): answer with the single letter of the correct option. If no \
option is correct, or the text does not match the images, answer with the letter of the option \
"None of the choices provided".

Reason inside <think></think> tags, then give only the answer inside <answer></answer> tags:
<think>what each image shows, and why the answer follows</think>
<answer>the answer alone</answer>"""


@lru_cache(maxsize=8)
def _compiled(source: str):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)
    return env.from_string(source)


def render_prompt(problem: str, template: str | Path | None = None) -> str:
    """Wrap a question's text in the preamble (default, or a Jinja template file's).

    Example:
        >>> "<image>" in render_prompt("Order these: A <image>")
        True
    """
    import jinja2

    source = DEFAULT_PREAMBLE if template is None else load_template(template)
    try:
        return _compiled(source).render(content=problem)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"prompt template {str(template)!r} does not render: {type(exc).__name__}: {exc}; "
                          "it may use only {{ content }}") from exc
