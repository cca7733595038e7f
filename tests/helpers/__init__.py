"""What several tests need, in one place: free ports, a real `mlflow server`, copies of the demo folder,
small search spaces and trimmed splits for scenario studies, and `clinft` run as a command or in-process.

A scenario study is sized to the smallest search space and splits that still show its point
(`small_study`); what costs a full study is a fixture in `conftest.py` that says so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]  # the repository root

# Outputs of a run in a study folder: left out when a test copies the demo to run it afresh.
OUTPUTS = frozenset({"ray", "mlflow.db", "mlartifacts", "results.json", "outcomes.jsonl", "report.md", "report.html",
                     "figures", "progress.json", "reference_logps", "clinft.log", "registry"})

# One SFT trial and one DPO trial, a few steps each: a study that runs every stage end to end.
SFT_ONE = {"stage": "sft", "learning_rate": {"grid": [1.0e-2]}, "max_steps": 20, "eval_steps": 10, "batch_size": 8,
           "lr_scheduler": "constant"}
DPO_ONE = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1]}, "max_steps": 4,
           "eval_steps": 2, "batch_size": 8, "lr_scheduler": "constant"}
# The shared small study (`small_run`), which the interruption scenarios rerun and compare with: SFT
# long enough to be stopped while it trains, three DPO trials for a kill to land between them.
RESUMABLE_SFT = {"stage": "sft", "learning_rate": {"grid": [1.0e-2, 1.0e-3]}, "max_steps": 60, "eval_steps": 10,
                 "batch_size": 8, "lr_scheduler": "constant"}
RESUMABLE_DPO = {"stage": "dpo", "learning_rate": {"grid": [1.0e-3]}, "beta": {"grid": [0.1, 0.3, 0.5]},
                 "max_steps": 10, "eval_steps": 5, "batch_size": 8, "lr_scheduler": "constant"}
# The rows a small scenario study keeps of each split of a task (train whole where a model must learn
# from it: its first rows are what SFT sees in 20 steps of 8).
SMALL_ROWS = {"train": 300, "eval": 40, "dev": 40, "test": 60}


def free_port() -> int:
    """A port nothing listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """A TCP link on 127.0.0.1 to a server's port that a test can cut and restore: while it is cut, new
    connections are refused and open ones are closed, which is what a client sees of a server that
    went down (or of the network between them), and restoring it is instant."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)  # shutdown first: on Linux a bare close leaves a blocked accept() accepting
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            _close(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {source, sink}
            _close(source)
            _close(sink)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and an artifact folder under `root`, reached
    through a `Link` (`url`): `outage()` cuts the link and `back()` restores it, as a server that goes
    down and comes back with its store looks to a client, without the ~20 s of a real restart."""

    def __init__(self, root: Path):
        self.root, self.server_port, self.proc = root, free_port(), None
        self.link: Link | None = None
        self.url = ""

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.server_port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.server_port}/health", timeout=2)
                self.link = Link(self.server_port)
                self.url = f"http://127.0.0.1:{self.link.port}"
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not come up in 90 s")

    def outage(self) -> None:
        self.link.cut()

    def back(self) -> None:
        self.link.restore()

    def stop(self) -> None:
        if self.link is not None:
            self.link.cut()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def copy_demo(demo_dir: Path, dest: Path, also_skip: tuple[str, ...] = ()) -> Path:
    """The demo folder's inputs (data, tiny model, spaces, study.yaml) copied to `dest`, no outputs of
    any run (nor the entries `also_skip`); returns the copy's study.yaml."""
    skip = OUTPUTS | set(also_skip)
    shutil.copytree(demo_dir, dest, ignore=lambda _, names: [n for n in names if n in skip], dirs_exist_ok=True)
    return dest / "study.yaml"


def trimmed(source: Path, out: Path, rows: dict[str, int]) -> dict[str, str]:
    """The first `rows[split]` rows of each split of a task folder, written to `out`; split -> path."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in rows.items():
        lines = (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {split: str(out / f"{split}.jsonl") for split in rows}


def small_study(demo_dir: Path, dest: Path, *, sft: dict[str, Any] = SFT_ONE, dpo: dict[str, Any] = DPO_ONE,
                rows: dict[str, int] | None = SMALL_ROWS, sets: tuple[str, ...] = ()) -> Path:
    """A copy of the demo study in `dest` with its own small search spaces (sft.yaml, dpo.yaml) and the
    demo task's splits trimmed to `rows` (None: whole), the overrides `sets` written into its
    study.yaml; returns that study.yaml, ready for `load_study` or `clinft run`."""
    from clinft_ray.config import apply_override, parse_overrides

    config_path = copy_demo(demo_dir, dest)
    (dest / "sft.yaml").write_text(yaml.safe_dump(sft))
    (dest / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    config = yaml.safe_load(config_path.read_text())
    config["sft"]["space"], config["dpo"]["space"] = "sft.yaml", "dpo.yaml"
    if rows is not None:
        kind = config["tasks"][0]["kind"]
        splits = trimmed(dest / "data" / kind, dest / "data" / f"{kind}-small", rows)
        config["tasks"][0]["splits"] = {s: str(Path(p).relative_to(dest)) for s, p in splits.items()}
    for key, value in parse_overrides(list(sets)):
        apply_override(config, key, value)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def clinft(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`clinft ARGS` as a user runs it: its own interpreter; returns what it printed and its exit code."""
    return subprocess.run([sys.executable, "-m", "clinft_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def clinft_popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`clinft ARGS` started as a command, for a test that signals or kills it; `env` is added to this
    process's environment."""
    return subprocess.Popen([sys.executable, "-m", "clinft_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def clinft_here(capsys: Any, *args: str) -> subprocess.CompletedProcess:
    """`clinft ARGS` in this process (`cli.main`, what the command runs), its output read from `capsys`:
    the same exit code and text as the command, without an interpreter start and imports per case."""
    from clinft_ray.cli import main

    code = main(list(args))
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(["clinft", *args], code, printed.out, printed.err)


def clinft_in_process(capsys: Any, *args: str) -> tuple[int, list[str], str]:
    """`clinft ARGS` in this process (`clinft_here`): (exit code, its `clinft: error:` lines, all it printed)."""
    res = clinft_here(capsys, *args)
    text = res.stdout + res.stderr
    return res.returncode, [line for line in text.splitlines() if line.startswith("clinft: error:")], text


def whole_checkpoint(folder: Path, step: int) -> Path:
    """A small checkpoint folder with clinft's manifest (written last, listing every file): whole."""
    from clinft_ray.config import ModelConfig
    from clinft_ray.modeling import write_manifest

    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (folder / "optimizer.pt").write_bytes(b"o" * 2000)
    (folder / "sub").mkdir()
    (folder / "sub" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    write_manifest(folder, ModelConfig(name_or_path="tiny"), parent=None, init_from=None, step=step)
    return folder
