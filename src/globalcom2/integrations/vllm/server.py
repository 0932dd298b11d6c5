"""``vllm serve`` as a subprocess on 127.0.0.1, and OpenAI chat requests carrying base64 images.

Shared by ``globalcom2 serve-bench`` and the serving tests. Nothing here imports vLLM: the server runs
in a child interpreter (by default this one, which must have vLLM and see globalcom2, e.g. through
``PYTHONPATH``; the child inherits the environment), so a tool that only drives a server needs neither.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

#: chat template of the LLaVA-1.6 (Vicuna) prompt format, ``USER: <image>\\n{text} ASSISTANT:``; the tiny
#: tokenizers carry none
LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>\n{% endif %}{% endfor %}"
    " ASSISTANT:{% endif %}{% endfor %}"
)


def source_env() -> dict[str, str]:
    """``PYTHONPATH`` putting the running globalcom2 first, so a server child imports the same code (not
    another installed copy) and the plugin it loads is the one under test."""
    from pathlib import Path

    import globalcom2

    src = str(Path(globalcom2.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}


class ServerError(RuntimeError):
    """The server did not start or died; the message ends with the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(image, fmt: str = "PNG") -> bytes:
    """A PIL image encoded as ``fmt`` (PNG, JPEG, ...)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    """``data:{mime};base64,...`` for raw bytes (which need not be an image: the tests send bad ones)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(model: str, image_urls: Sequence[str], text: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat-completions body: one user turn with the images first, then ``text``; greedy."""
    content = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content.append({"type": "text", "text": text})
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # every request decodes exactly max_tokens tokens
        "return_token_ids": True,  # vLLM extension: prompt and generated token ids in the reply
    }
    body.update(extra)
    return body


def serve_command(
    model: str,
    port: int,
    *,
    served_name: str = "model",
    overrides: dict | None = None,
    chat_template: str | None = None,
    max_model_len: int = 2048,
    limit_images: int = 1,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The ``vllm serve`` command line (as ``python -m vllm.entrypoints.cli.main serve``, which is what the
    ``vllm`` console script runs, with a chosen interpreter) for a local fp32 checkpoint on 127.0.0.1."""
    cmd = [
        python, "-m", "vllm.entrypoints.cli.main", "serve", model,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
        "--enforce-eager", "--dtype", "float32", "--max-model-len", str(max_model_len), "--seed", "0",
        "--limit-mm-per-prompt", json.dumps({"image": limit_images}),
    ]  # fmt: skip
    if overrides is not None:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    if chat_template is not None:
        cmd += ["--chat-template", chat_template]
    return cmd + list(extra)


class Server:
    """One ``vllm serve`` subprocess (its own process group), its log file, and its process tree's RSS / CPU."""

    def __init__(self, cmd: Sequence[str], log_path: str, env: dict[str, str] | None = None, name: str = "") -> None:
        self.cmd, self.log_path, self.name = list(cmd), log_path, name
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.port = int(self.cmd[self.cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start_s = float("nan")
        self._t0 = 0.0

    def start(self) -> Server:
        """Spawn the server (does not wait for it)."""
        self._log = open(self.log_path, "wb")
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        return self

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the server's log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        """The server process is running."""
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 5.0) -> bool:
        """``GET /health`` answers 200."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    def chat(self, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """POST ``body`` (``chat_body``) to ``/v1/chat/completions``; the decoded JSON reply."""
        req = urllib.request.Request(
            self.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)

    def wait_ready(self, timeout: float = 600.0) -> float:
        """Block until ``/health`` answers; returns the seconds since start. ServerError if it dies or times out."""
        deadline = self._t0 + timeout
        while True:
            if not self.alive():
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"{self.name or 'vllm serve'} exited with code {code}; log:\n{self.log_tail()}")
            if self.healthy():
                self.start_s = time.monotonic() - self._t0
                return self.start_s
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name or 'vllm serve'} did not answer /health in {timeout:.0f} s; log:\n"
                                  f"{self.log_tail()}")  # fmt: skip
            time.sleep(1.0)

    def _tree(self) -> list:
        import psutil

        if not self.alive():
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def rss_bytes(self) -> int:
        """Resident memory of the server's process tree (API server, engine core, worker), summed."""
        import psutil

        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server's live process tree has used so far."""
        import psutil

        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (the one ``start`` created), SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            try:  # children left in the group once the API server is gone
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Server:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def served_tokens(
    model: str, architecture: str, options: dict | None, chat_template: str, images: Sequence, text: str,
    max_tokens: int, log_dir: str, name: str = "", limit_images: int = 1, timeout: float = 600.0,
) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """Start ``vllm serve`` on ``model`` with the plugin (``options``; None: stock), send one chat request per
    image (base64 PNG, then ``text``; greedy, exactly ``max_tokens`` tokens with EOS masked) and return each
    reply's (prompt token ids, generated token ids),
    in order; the server is stopped on the way out. ServerError if it does not start or dies meanwhile."""
    import os.path

    template = os.path.join(log_dir, f"{name or 'chat'}.jinja")
    with open(template, "w") as f:
        f.write(chat_template)
    overrides = None if options is None else {"architectures": [architecture], "globalcom2": options}
    # "openai": the template walks each message's content parts; vLLM's guess from the template's text can be
    # "string", which flattens the parts into one string the template then walks character by character
    cmd = serve_command(model, free_port(), overrides=overrides, chat_template=template, limit_images=limit_images,
                        extra=["--chat-template-content-format", "openai"])  # fmt: skip
    out = []
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **source_env()}
    with Server(cmd, os.path.join(log_dir, f"{name or 'server'}.log"), env=env, name=name) as server:
        server.wait_ready(timeout)
        for image in images:
            body = chat_body("model", [data_url(image_bytes(image, "PNG"))], text, max_tokens, min_tokens=max_tokens)
            reply = server.chat(body)  # min_tokens: EOS masked, as LLM.generate with SamplingParams(min_tokens=...)
            out.append((list(reply["prompt_token_ids"]), list(reply["choices"][0]["token_ids"])))
        if not server.alive():
            raise ServerError(f"{name or 'vllm serve'} died after answering; log:\n{server.log_tail()}")
    return out
