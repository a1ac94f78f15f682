"""One results writer for evaluations and benchmarks: atomic JSON, per-sample JSONL, resume.

A run folder holds ``results.json`` (config, scores, versions, machine; rewritten atomically, so an
interrupted run never leaves half a file) and ``samples.jsonl`` (one record per finished sample,
appended and flushed as it finishes). Reopening the folder with ``resume=True`` skips the sample ids
already present; reopening it without ``resume`` refuses to overwrite anything.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name, or the CPU's cores, architecture, model and vector ISA: timings on CPUs of one
    name can differ 2x (a bf16-capable AVX512 core scores selections in bf16, an AVX2 one in fp32)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    parts = [f"{os.cpu_count()} cores", platform.processor() or platform.machine(), *cpu_features().values()]
    return f"cpu ({', '.join(str(p) for p in parts if p)})"


def cpu_features() -> dict:
    """``model`` (from /proc/cpuinfo where there is one), ``isa`` (the vector level ATen dispatches
    to: AVX2, AVX512, ...) and ``bf16`` ("native bf16" where the CPU has bf16 arithmetic)."""
    from sparse_llm.backends.selection import cpu_has_native_bf16

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    isa = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"model": model, "isa": isa, "bf16": "native bf16" if cpu_has_native_bf16() else None}


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_metadata(device: str | torch.device = "cpu") -> dict:
    """Versions, git hash, machine and date: what every result file records beside its numbers."""
    import transformers

    import sparse_llm

    return {
        "versions": {
            "sparse_llm": sparse_llm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "git": _git_hash(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device_name(device)},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-able config (for readable-but-unique folder names)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]


class ResultsStore:
    """The files of one run folder.

    Args:
        folder: the run's folder (created).
        config: the run's JSON-able configuration; stored in ``config.json``. A resumed run must
            have the same configuration, or its old samples would be mixed with different ones.
        resume: reuse the samples of an earlier, interrupted run in ``folder``. Without it, a folder
            that already holds samples or results raises ``FileExistsError``.
    """

    def __init__(self, folder: str | os.PathLike, config: dict, resume: bool = False):
        self.folder = Path(folder)
        self.config = json.loads(json.dumps(config, default=str))
        self._git_at_start = _git_hash()  # the code that ran, not the HEAD when the run ended
        self._records: dict[str, dict] = {}
        existing = [self.folder / n for n in (SAMPLES_FILE, RESULTS_FILE) if (self.folder / n).exists()]
        if existing and not resume:
            raise FileExistsError(
                f"{self.folder} already holds results ({', '.join(p.name for p in existing)}); "
                "pass resume=True (--resume) to continue that run, or choose another output folder"
            )
        config_path = self.folder / CONFIG_FILE
        if resume and config_path.exists():
            stored = json.loads(config_path.read_text())
            if stored != self.config:
                keys = set(stored) | set(self.config)
                changed = sorted(k for k in keys if stored.get(k) != self.config.get(k))
                raise ValueError(
                    f"cannot resume {self.folder}: its configuration differs in {changed}; "
                    "use the same options or another output folder"
                )
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(config_path, self.config)
        samples = self.folder / SAMPLES_FILE
        if samples.exists():
            for line in samples.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed mid-write
                    continue
                self._records[str(record["id"])] = record
            # Rewrite without a torn last line, so appends start on a clean line.
            atomic_write_text(samples, "".join(json.dumps(r) + "\n" for r in self._records.values()))

    def done(self, sample_id) -> bool:
        return str(sample_id) in self._records

    def add(self, record: dict) -> None:
        """Append one finished sample (a dict with a unique ``"id"``), flushed to disk at once."""
        if "id" not in record:
            raise ValueError("a sample record needs an 'id'")
        record = json.loads(json.dumps(record, default=str))
        record["id"] = str(record["id"])
        self._records[record["id"]] = record
        with open(self.folder / SAMPLES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        return list(self._records.values())

    def pending(self, ids: Iterable) -> list:
        return [i for i in ids if not self.done(i)]

    def write_results(self, scores: dict, device: str | torch.device = "cpu") -> Path:
        """Write ``results.json``: the config, the scores and the run's metadata (atomically)."""
        path = self.folder / RESULTS_FILE
        meta = run_metadata(device)
        if meta["git"] != self._git_at_start:
            meta["git_at_end"], meta["git"] = meta["git"], self._git_at_start
        atomic_write_json(path, {"config": self.config, "scores": scores, **meta})
        return path
