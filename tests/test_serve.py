"""Deployment: ``lowbit serve`` (OpenAI-compatible, llama-cpp-python) and ``lowbit export ollama``.

Fast tests use tiny GGUF files written with gguf-py (no weights that run). The server tests start
``lowbit serve`` on the real SmolLM2 GGUF in a subprocess and talk to it with the official ``openai``
client (marked slow). The Go templates of the Modelfile are executed by Go's own text/template (the
engine Ollama runs them with; ``tests/go/render.go``, built with the Go toolchain) and compared with the
Jinja template's output.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lowbit.cli import main
from lowbit.core.errors import LowbitError
from lowbit.serve.llamacpp import read_chat_info
from lowbit.serve.ollama import FAMILIES, PROBE, PROBE_SYSTEM, export_ollama, recognise, render_jinja

CHATML_SMOL = (  # SmolLM2-Instruct: ChatML with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt"
    " %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"""
MISTRAL = (  # no system role, [INST] blocks: no family lowbit translates
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
NEEDS = "serving needs llama-cpp-python[server]: pip install -e '.[llamacpp]'"
TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "a", "b"]


def write_gguf(path: Path, template: str | None = None, eos: int = 2, eot: int | None = None) -> Path:
    """A small, complete GGUF file: a few tokenizer keys and one tensor (not a model that runs)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_token_list(TOKENS)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos)
    if eot is not None:
        w.add_eot_token_id(eot)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.arange(len(TOKENS) * 64, dtype=np.float32).reshape(len(TOKENS), 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _said(capsys) -> str:  # type: ignore[no-untyped-def]
    r = capsys.readouterr()
    return str(r.out + r.err)


# --- Go's own text/template: tests/go/render.go, built once per session ---------------------------------------

GO_SRC = Path(__file__).with_name("go") / "render.go"


@pytest.fixture(scope="module")
def go_execute(tmp_path_factory):  # type: ignore[no-untyped-def]
    """``go_execute(template, values) -> str``: the template run by Go's text/template, as Ollama runs it."""
    import json
    import shutil

    go = shutil.which("go")
    if go is None:
        pytest.skip("the Modelfile templates are checked with Go's text/template: install Go "
                    "(scripts/install_test_clients.sh, or apt-get install golang-go)")
    tmp = tmp_path_factory.mktemp("go")
    exe = tmp / "render"
    env = {**os.environ, "GOCACHE": str(tmp / "cache"), "GOPATH": str(tmp / "path"), "GO111MODULE": "off"}
    r = subprocess.run([go, "build", "-o", str(exe), str(GO_SRC)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr

    def run(template: str, values: dict) -> str:
        res = subprocess.run([str(exe)], input=json.dumps({"template": template, "values": values}),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    return run


def _ollama_values(system: str | None, msgs: list[tuple[str, str]]) -> dict:
    """Ollama's template values: system messages are both in .System and in .Messages."""
    messages = ([{"Role": "system", "Content": system}] if system else []) + [
        {"Role": r, "Content": c} for r, c in msgs]
    return {"System": system or "", "Messages": messages}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("system", [None, PROBE_SYSTEM])
def test_go_templates_render_like_their_python_mirror(go_execute, family, system):
    for msgs in (PROBE, PROBE[:1]):
        assert go_execute(family.go_template, _ollama_values(system, msgs)) == family.render(system, msgs)


@pytest.mark.parametrize("template, family, default_system", [
    (CHATML_SMOL, "chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    (LLAMA3, "llama3", None),
    (GEMMA3, "gemma", None),
    (MISTRAL, None, None),
])
def test_recognise_by_rendering(go_execute, tmp_path, template, family, default_system):
    info = read_chat_info(write_gguf(tmp_path / "m.gguf", template))
    rec = recognise(info)
    assert (rec.family.name if rec else None) == family
    if rec:
        assert rec.default_system == default_system
        go = go_execute(rec.family.go_template, _ollama_values(rec.default_system, PROBE))
        assert go == render_jinja(template, info, None, PROBE)  # Ollama's prompt == the model's own template


def test_export_ollama_modelfile(tmp_path, capsys):
    gg = write_gguf(tmp_path / "smol.gguf", CHATML_SMOL, eos=4)
    assert main(["export", "ollama", str(gg)]) == 0
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./smol.gguf\n" in text and 'TEMPLATE """{{- if .System }}<|im_start|>system' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert re.findall(r'PARAMETER stop "(.*)"', text) == ["<|im_end|>", "<|im_start|>"]
    assert main(["export", "ollama", str(gg)]) == 2  # exists: refused without --force
    assert "--force" in _said(capsys)
    assert main(["export", "ollama", str(gg), "--force", "--system", "Be brief."]) == 0
    assert 'SYSTEM """Be brief."""' in (tmp_path / "Modelfile").read_text()


def test_export_ollama_untranslatable_template(tmp_path):
    gg = write_gguf(tmp_path / "mistral.gguf", MISTRAL, eos=2, eot=6)
    out = tmp_path / "other" / "Modelfile"
    res = export_ollama(gg, out)
    text = out.read_text()
    assert res.family is None and "TEMPLATE" not in text.replace("TEMPLATE left out", "")
    assert "matches no family" in text and f"FROM {gg.resolve()}\n" in text  # another folder: absolute path
    assert re.findall(r'PARAMETER stop "(.*)"', text) == ["<end_of_turn>", "</s>"]  # EOT, then EOS
    res = export_ollama(write_gguf(tmp_path / "base.gguf"), tmp_path / "base.Modelfile")
    assert res.family is None and "has none" in res.note


def _truncations(good: Path, tmp_path: Path) -> list[Path]:
    data = good.read_bytes()
    cuts = {"header": 20, "kv": len(data) // 3, "tensor": len(data) - 100}
    out = []
    for name, n in cuts.items():
        p = tmp_path / f"cut-{name}.gguf"
        p.write_bytes(data[:n])
        out.append(p)
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF")
    return [*out, bad]


@pytest.mark.parametrize("command", [["serve"], ["export", "ollama"]])
def test_truncated_or_foreign_files_are_refused(tmp_path, capsys, command):
    good = write_gguf(tmp_path / "good.gguf", CHATML_SMOL)
    for bad in _truncations(good, tmp_path):
        assert main([*command, str(bad), "--port", "1"] if command == ["serve"] else [*command, str(bad)]) == 2
        err = _said(capsys)
        assert re.search(r"truncated|corrupt|not a GGUF file", err), err
        assert "Fix:" in err
    assert not (tmp_path / "Modelfile").exists()


def test_serve_options_are_checked(tmp_path, capsys):
    gg = write_gguf(tmp_path / "m.gguf", CHATML_SMOL)
    assert main(["serve", str(gg), "--port", "70000"]) == 2
    assert "not a TCP port" in _said(capsys)
    with socket.socket() as s:  # a port in use
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", str(gg), "--port", str(s.getsockname()[1])]) == 2
        assert "cannot listen" in _said(capsys)


def test_chat_format_choice(tmp_path, caplog):
    from lowbit.serve.llamacpp import choose_chat_format

    assert choose_chat_format(read_chat_info(write_gguf(tmp_path / "t.gguf", CHATML_SMOL)), None) is None
    with caplog.at_level(logging.WARNING, logger="lowbit.serve.llamacpp"):
        assert choose_chat_format(read_chat_info(write_gguf(tmp_path / "b.gguf")), None) is None
    assert "no tokenizer.chat_template" in caplog.text and "--chat-format" in caplog.text
    pytest.importorskip("llama_cpp", reason=NEEDS)
    info = read_chat_info(tmp_path / "t.gguf")
    assert choose_chat_format(info, "chatml") == "chatml"
    assert choose_chat_format(info, "chat_template.default") == "chat_template.default"
    with pytest.raises(LowbitError, match="unknown --chat-format 'nope'; use one of: .*chatml"):
        choose_chat_format(info, "nope")


# --- the real server ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def smol_gguf(tmp_path_factory) -> Path:
    from lowbit.models.sources import ensure_gguf

    src = ensure_gguf("smollm2-135m")
    link = tmp_path_factory.mktemp("smol") / "smol.gguf"  # Modelfiles must not land in the cache
    os.symlink(src, link)
    return link


def _start(gguf: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", str(gguf), "--port", str(port), "--ctx", "512", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}):\n{proc.stdout.read()}")  # type: ignore
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except urllib.error.HTTPError:  # 401: up, and asking for the key
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("server did not answer within 180 s")


def _stop(proc: subprocess.Popen, sig: int, port: int) -> str:
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0 and "Traceback" not in out, out  # a graceful shutdown, then exit status 0
    assert _port_free(port)
    return out


def _template_tokens(gguf: Path, question: str) -> int:
    """Tokens of the prompt the GGUF's own Jinja template makes (with its default system prompt)."""
    import llama_cpp

    info = read_chat_info(gguf)
    prompt = render_jinja(info.template or "", info, None, [("user", question)])
    assert prompt and "SmolLM" in prompt
    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    return len(vocab.tokenize(prompt.encode(), add_bos=vocab.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                               special=True))


def _coherent(text: str) -> bool:
    """Non-empty, printable, made of words (the 135M model's answers are not always right, but they are text)."""
    text = text.strip()
    words = re.findall(r"[^\W\d_]{2,}", text)
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in text) / max(len(text), 1)
    return bool(text) and len(words) >= 2 and printable > 0.95 and "<|im_" not in text


@pytest.mark.slow
def test_serve_chat_completions_with_openai_client(smol_gguf):
    pytest.importorskip("llama_cpp.server.app", reason=NEEDS)
    import openai

    port = _free_port()
    proc = _start(smol_gguf, port, "--api-key", "sekret", "--threads", "1")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekret", timeout=120)
        assert [m.id for m in client.models.list().data] == ["smol"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smol", messages=messages, max_tokens=48, temperature=0)
        answer = r.choices[0].message.content or ""
        print(f"answer: {answer!r} ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens)")
        assert _coherent(answer) and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == _template_tokens(smol_gguf, messages[0]["content"])
        stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=48, temperature=0,
                                                stream=True)
        parts = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        print(f"streamed {len(parts)} chunks: {''.join(parts)!r}")
        assert len(parts) > 1 and _coherent("".join(parts))
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()
    except BaseException:
        proc.kill()
        print(proc.communicate()[0])
        raise
    assert "Application shutdown complete" in _stop(proc, signal.SIGINT, port)


@pytest.mark.slow
def test_serve_stops_cleanly_on_sigterm(smol_gguf):
    pytest.importorskip("llama_cpp.server.app", reason=NEEDS)
    port = _free_port()
    proc = _start(smol_gguf, port)
    _stop(proc, signal.SIGTERM, port)


@pytest.mark.slow
def test_real_gguf_modelfile_and_truncation(smol_gguf, tmp_path, capsys):
    res = export_ollama(smol_gguf)
    assert res.family == "chatml" and res.system and "SmolLM" in res.system
    cut = tmp_path / "cut.gguf"
    with open(smol_gguf, "rb") as f:
        cut.write_bytes(f.read(smol_gguf.stat().st_size // 2))
    assert main(["serve", str(cut)]) == 2
    assert "truncated" in _said(capsys)


@pytest.mark.slow
def test_serve_gguf_concurrent_streams_and_bad_requests(smol_gguf):
    """Four concurrent streams all run to a finish_reason (llama-cpp-python's default would end three of
    them after one chunk); no CORS header for a foreign origin; malformed JSON, an unknown model and a
    prompt longer than the context are 4xx, a streamed one too; the server then still answers."""
    pytest.importorskip("llama_cpp.server.app", reason=NEEDS)
    import asyncio
    import json
    import urllib.error
    import urllib.request

    import openai

    port = _free_port()
    proc = _start(smol_gguf, port, "--threads", "1")
    url = f"http://127.0.0.1:{port}/v1"

    def post(path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, Any]:
        req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers

    try:
        client = openai.AsyncOpenAI(base_url=url, api_key="x", timeout=300)

        async def one(i: int) -> str | None:
            s = await client.completions.create(model="smol", prompt=f"Count to {i + 3}:", max_tokens=12,
                                                temperature=0, stream=True)
            fin = None
            async for ch in s:
                fin = ch.choices[0].finish_reason or fin
            return fin

        async def all4() -> list[str | None]:
            return await asyncio.gather(*[one(i) for i in range(4)])

        assert all(f in ("stop", "length") for f in asyncio.run(all4()))
        code, err, hdrs = post("/completions", b'{"prompt": "hi", "max_tokens": 1}', {"Origin": "http://evil.example"})
        assert code == 403 and "access-control-allow-origin" not in {k.lower() for k in hdrs}
        assert post("/completions", b"{oops")[0] == 400
        code, err, _ = post("/completions", json.dumps({"model": "gpt-4", "prompt": "hi"}).encode())
        assert code == 404 and err["error"]["code"] == "model_not_found"
        for stream in (False, True):
            code, err, _ = post("/completions", json.dumps({"prompt": "word " * 600, "stream": stream}).encode())
            assert code == 400 and err["error"]["code"] == "context_length_exceeded", err
        code, res, _ = post("/completions", json.dumps({"prompt": "Hello", "max_tokens": 3}).encode())
        assert code == 200 and res["choices"][0]["finish_reason"] in ("stop", "length")
    except BaseException:
        proc.kill()
        print(proc.communicate()[0])
        raise
    _stop(proc, signal.SIGINT, port)
