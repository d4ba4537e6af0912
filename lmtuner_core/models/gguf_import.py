"""GGUF in: a `.gguf` file given as `model` becomes a Hugging Face folder that every tool can use.

transformers' own GGUF loader (with the `gguf` package) dequantizes the file; we save the result once under
$LMTUNER_HOME/models/<sha256 prefix>/ and reuse it. The conversion runs in a child process (it imports torch and
holds the whole model in memory, which the server must not), writes into a temporary folder and renames it into
place, under a file lock: two jobs never see half a folder, and the second waits for the first instead of
converting again. The folder's `gguf_source.json` records which file it came from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import lmtuner_home

SOURCE_RECORD = "gguf_source.json"
# A 135M model converts in ≈30 s on 2 cores; a 7B one in minutes. Past this the child is stuck, not slow.
CONVERT_TIMEOUT_SECONDS = 3600
_digests: dict[tuple, str] = {}


def find_gguf(path: Path, field: str = "model") -> Path | None:
    """The GGUF file a `model` path names: the file itself, or the only `.gguf` in a folder without config.json.
    None for anything else (a Hugging Face folder, or a path the caller reports as missing)."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise LmtunerError(
            f"{field}: {path} is a file but not a .gguf; give a model folder (config.json + weights) or a .gguf file",
            field=field,
        )
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LmtunerError(
            f"{field}: folder {path} holds {len(found)} .gguf files ({names}); give the path of the one to use",
            field=field,
        )
    return found[0] if found else None


def file_digest(path: Path) -> str:
    """sha256 of the file, remembered per (inode, size, mtime) so repeated tool calls do not re-read it."""
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def gguf_source(model_dir: str | Path) -> str | None:
    """The .gguf file a converted folder was made from, or None for any other folder (or a hub id)."""
    record = Path(model_dir) / SOURCE_RECORD
    try:
        return json.loads(record.read_text(encoding="utf-8"))["gguf_file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def converted_folder(gguf_path: Path, field: str = "model") -> Path:
    """$LMTUNER_HOME/models/<hash>/, converting the file on first use (see the module docstring)."""
    digest = file_digest(gguf_path)
    models = lmtuner_home() / "models"
    target = models / digest[:16]
    if (target / "config.json").is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with (models / f".{digest[:16]}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / "config.json").is_file():  # another process finished it while we waited
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:16]}-", dir=models))
        scratch.chmod(0o755)  # mkdtemp makes it private; the model folder is readable like the others
        try:
            _run_conversion(gguf_path, scratch, field)
            record = {"gguf_file": str(gguf_path), "sha256": digest, "size_bytes": gguf_path.stat().st_size}
            (scratch / SOURCE_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)  # a folder left without config.json is not ours to keep
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _run_conversion(gguf_path: Path, output_dir: Path, field: str) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lmtuner_core.models.gguf_import", str(gguf_path), str(output_dir)],
            capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT_SECONDS,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LmtunerError(
            f"{field}: converting {gguf_path} did not finish in {CONVERT_TIMEOUT_SECONDS} s", field=field
        ) from None
    last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        outcome = json.loads(last)
    except ValueError:
        outcome = {}
    if proc.returncode == 0 and outcome.get("ok"):
        return
    if "error" in outcome:
        raise LmtunerError(f"{field}: {outcome['error']}", field=field)
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    raise LmtunerError(
        f"{field}: converting {gguf_path} failed (exit code {proc.returncode}); last lines:\n{tail}", field=field
    )


def _convert(gguf_path: Path, output_dir: Path) -> None:
    """In the child: load with transformers' GGUF loader (dequantized to float32) and save a plain folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    transformers.utils.logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as exc:
        if "not supported" in str(exc):
            raise LmtunerError(
                f"{exc} transformers can load GGUF files of these architectures: "
                f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}; convert the original model instead, or give its "
                "Hugging Face folder"
            ) from None
        raise LmtunerError(f"{gguf_path} could not be read as GGUF ({exc})") from None
    # The loaded model is marked as quantized by the GGUF loader; its weights are already plain float32 tensors,
    # and save_pretrained refuses ("not serializable") until that mark is gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))


if __name__ == "__main__":
    try:
        _convert(Path(sys.argv[1]), Path(sys.argv[2]))
    except LmtunerError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        sys.exit(2)
    print(json.dumps({"ok": True}), flush=True)
