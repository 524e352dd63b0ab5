"""An Ollama ``Modelfile`` for a GGUF file: FROM, TEMPLATE (Go), SYSTEM and PARAMETER stop.

GGUF chat templates are Jinja; Ollama's are Go ``text/template``. There is no general translation, so
we recognise a template by what it does: the GGUF's Jinja template is rendered on probe conversations
(with and without a system message) and compared, string for string, with the layout of each known
family (ChatML, Llama 3, Gemma). On a match we write that family's Go template, whose output for the
same conversation is what :attr:`ChatFamily.render` returns (a line-by-line mirror of it). A default
system prompt that the Jinja template inserts when none is given (SmolLM2, Qwen2.5) becomes ``SYSTEM``,
since the Go template prints ``.System`` only when set. A template of no known family gets no TEMPLATE
line, and the Modelfile says so: Ollama then picks a template from the GGUF's own (its built-in table).
The leading BOS a Jinja template may print is not part of the comparison (the engine adds it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowbit import __version__
from lowbit.core.errors import LowbitError
from lowbit.core.io import check_output_file, write_text_atomic
from lowbit.serve.llamacpp import ChatInfo, check_gguf_file, read_chat_info

log = logging.getLogger(__name__)

Messages = list[tuple[str, str]]  # (role, content), roles user/assistant
PROBE_SYSTEM = "You are a terse test assistant."
_BOS = "\x00bos\x00"  # stands for bos_token, to drop it when it leads
PROBE: Messages = [("user", "Hi there."), ("assistant", "Hello! How can I help?"), ("user", "Name a colour.")]


def _chatml(system: str | None, msgs: Messages) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return head + "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in msgs) + "<|im_start|>assistant\n"


def _llama3(system: str | None, msgs: Messages) -> str:
    def turn(role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"

    head = turn("system", system) if system else ""
    return head + "".join(turn(r, c) for r, c in msgs) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _gemma(system: str | None, msgs: Messages) -> str:
    out, pending = "", system
    for role, content in msgs:
        if role == "user":
            text = f"{pending}\n\n{content}" if pending else content
            pending = None
            out += f"<start_of_turn>user\n{text}<end_of_turn>\n"
        else:
            out += f"<start_of_turn>model\n{content}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"


# Go templates: .System is Ollama's system prompt (request or SYSTEM), .Messages every message with
# .Role/.Content (system messages included, hence the role checks).
_CHATML_GO = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
_LLAMA3_GO = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
_GEMMA_GO = """{{- $sys := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $sys }}{{ $sys }}

{{ $sys = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""


@dataclass(frozen=True)
class ChatFamily:
    """A chat layout written down twice: as a Go template for Ollama and as a Python mirror to check it against."""

    name: str
    go_template: str
    render: Callable[[str | None, Messages], str]
    stops: tuple[str, ...]
    system_re: str | None  # pulls a default system prompt out of the text before the first turn


FAMILIES = (
    ChatFamily("chatml", _CHATML_GO, _chatml, ("<|im_end|>", "<|im_start|>"),
               r"<\|im_start\|>system\n(.*)<\|im_end\|>\n"),
    ChatFamily("llama3", _LLAMA3_GO, _llama3, ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
               r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*)<\|eot_id\|>"),
    ChatFamily("gemma", _GEMMA_GO, _gemma, ("<end_of_turn>",), None),
)


def render_jinja(template: str, info: ChatInfo, system: str | None, msgs: Messages) -> str | None:
    """The GGUF's Jinja template applied to a conversation (generation prompt on); None on error.

    A leading ``bos_token`` is dropped (the engine adds BOS itself); a BOS written literally is kept.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: "")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": r, "content": c} for r, c in msgs]
    try:
        text = env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=_BOS, eos_token=info.eos or "")
    except Exception:  # any failure of a foreign template means "not recognised"
        return None
    return text.removeprefix(_BOS)


@dataclass(frozen=True)
class Recognised:
    """A family whose layout the template reproduces, and the default system prompt it inserts (if any)."""

    family: ChatFamily
    default_system: str | None


def recognise(info: ChatInfo) -> Recognised | None:
    """The family of ``info.template`` by rendering probes; None when no family reproduces it exactly."""
    if not info.template:
        return None
    with_system = render_jinja(info.template, info, PROBE_SYSTEM, PROBE)
    without = render_jinja(info.template, info, None, PROBE)
    if without is None:
        return None
    for fam in FAMILIES:
        if with_system is not None and with_system != fam.render(PROBE_SYSTEM, PROBE):
            continue  # (a template that refuses system messages is judged on the other probe)
        plain = fam.render(None, PROBE)
        if without == plain:
            return Recognised(fam, None)
        default = _default_system(fam, without, plain)
        if default is not None:
            return Recognised(fam, default)
    return None


def _default_system(fam: ChatFamily, rendered: str, plain: str) -> str | None:
    """The system prompt a template inserts when given none: ``rendered`` is ``fam``'s layout with it."""
    if fam.system_re is None or not rendered.endswith(plain):
        return None
    m = re.fullmatch(fam.system_re, rendered[: len(rendered) - len(plain)], re.S)
    return m.group(1) if m and fam.render(m.group(1), PROBE) == rendered else None


@dataclass(frozen=True)
class OllamaExport:
    """What ``export_ollama`` wrote: the Modelfile, the template family (None: TEMPLATE left out), SYSTEM, stops."""

    path: Path
    family: str | None
    system: str | None
    stops: tuple[str, ...]
    note: str


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise LowbitError(f'the {what} contains """, which a Modelfile cannot quote; remove it')
    return f'"""{text}"""'


def _stop_line(stop: str) -> str:
    return 'PARAMETER stop "' + stop.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf: Path, out: Path, info: ChatInfo, system: str | None = None) -> tuple[str, OllamaExport]:
    """The Modelfile for ``gguf`` written at ``out`` (FROM relative when they share a folder)."""
    rec = recognise(info)
    frm = f"./{gguf.name}" if gguf.parent.resolve() == out.parent.resolve() else str(gguf.resolve())
    if system is None and rec is not None:
        system = rec.default_system
    stops = list(rec.family.stops) if rec else []
    stops += [t for t in (info.eot, info.eos) if t and t not in stops]
    if rec:
        note = f"chat template: the GGUF's Jinja template renders as {rec.family.name}; TEMPLATE is its Go equivalent"
    elif info.template:
        note = ("chat template: the GGUF's Jinja template matches no family lowbit translates (chatml, llama3, "
                "gemma); TEMPLATE left out, so Ollama derives one from the template in the GGUF")
    else:
        note = "chat template: the GGUF has none; TEMPLATE left out (Ollama's default is the raw prompt)"
    lines = [f"# Modelfile for {gguf.name}, written by lowbit {__version__}", f"# {note}", f"FROM {frm}"]
    if rec:
        lines.append(f"TEMPLATE {_quoted(rec.family.go_template, 'template')}")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    lines += [_stop_line(s) for s in stops]
    res = OllamaExport(out, rec.family.name if rec else None, system, tuple(stops), note)
    return "\n".join(lines) + "\n", res


def export_ollama(gguf: str | Path, out: str | Path | None = None, *, system: str | None = None,
                  force: bool = False) -> OllamaExport:
    """Write an Ollama Modelfile for a GGUF file (default ``Modelfile`` next to it); returns what was written."""
    path = check_gguf_file(gguf)
    target = Path(out) if out is not None else path.parent / "Modelfile"
    if target.is_dir():
        target = target / "Modelfile"
    if target.exists() and not force:
        raise LowbitError(f"{target} exists; pass --force to replace it or -o another path")
    check_output_file(target)  # a parent that is a file, or not writable: one line, not a traceback
    text, res = modelfile_text(path, target, read_chat_info(path), system)
    write_text_atomic(target, text)
    log.info("wrote %s (%s)", target, res.note)
    return res

