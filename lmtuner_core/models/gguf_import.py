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
import logging
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from lmtuner_core.errors import LmtunerError
from lmtuner_core.paths import lmtuner_home

logger = logging.getLogger(__name__)

SOURCE_RECORD = "gguf_source.json"
# A 135M model converts in ≈30 s on 2 cores, a 7B one in minutes: a base plus a share per GiB of the file. Past
# this the child is stuck (or fed a file made to be slow), not slow.
CONVERT_TIMEOUT_BASE_SECONDS = 300
CONVERT_TIMEOUT_SECONDS_PER_GIB = 300
# What a real GGUF's metadata holds at most, with room: the largest vocabularies are ≈260k tokens and merges; a
# model has thousands of tensors. gguf's reader spends Python time on every item, so more is refused unread.
MAX_GGUF_TENSORS = 100_000
MAX_GGUF_KEYS = 10_000
MAX_GGUF_ARRAY_ITEMS = 1_000_000  # one array
MAX_GGUF_ITEMS = 3_000_000  # all arrays together
MAX_GGUF_STRING_BYTES = 64 << 20  # one string (a chat template is kilobytes)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
_STRING, _ARRAY = 8, 9
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


def check_gguf_header(path: Path, field: str = "model") -> None:
    """Refuses a file whose header and metadata are not a GGUF model's, before any loader reads it: walks the
    key/value section (counts, types, lengths; strings skipped, not decoded) and stops at the first count past
    what a real model holds. By hand, since gguf's own reader builds every item in Python first."""

    def refuse(why: str) -> LmtunerError:
        return LmtunerError(f"{field}: {path.name} is not a GGUF model file that can be loaded: {why}", field=field)

    try:
        handle = path.open("rb")
    except OSError as exc:
        raise refuse(exc.strerror or "unreadable") from None
    with handle:
        size = path.stat().st_size
        if size < 24:
            raise refuse("too short for a GGUF header")
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    with data:
        magic, version, tensors, keys = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise refuse("no GGUF version 2 or 3 header")
        if tensors > MAX_GGUF_TENSORS or keys > MAX_GGUF_KEYS:
            raise refuse(f"it declares {tensors:,} tensors and {keys:,} metadata keys (at most {MAX_GGUF_TENSORS:,} "
                         f"and {MAX_GGUF_KEYS:,} are read)")  # fmt: skip
        at, items = 24, 0

        def string(at: int, what: str) -> int:
            if at + 8 > size:
                raise refuse(f"{what} runs past the end of the file")
            (length,) = struct.unpack_from("<Q", data, at)
            if length > MAX_GGUF_STRING_BYTES or at + 8 + length > size:
                raise refuse(f"{what} is {length:,} bytes long (at most {MAX_GGUF_STRING_BYTES:,}, within the file)")
            return at + 8 + length

        for _ in range(keys):
            name_at = at
            at = string(at, "a metadata key")
            key = bytes(data[name_at + 8 : at]).decode("utf-8", "replace")
            if at + 4 > size:
                raise refuse(f"metadata {key!r} runs past the end of the file")
            (kind,) = struct.unpack_from("<I", data, at)
            at += 4
            if kind in _SCALAR_SIZES:
                at += _SCALAR_SIZES[kind]
            elif kind == _STRING:
                at = string(at, f"metadata {key!r}")
            elif kind == _ARRAY:
                if at + 12 > size:
                    raise refuse(f"metadata {key!r} runs past the end of the file")
                item_kind, count = struct.unpack_from("<IQ", data, at)
                at += 12
                items += count
                if count > MAX_GGUF_ARRAY_ITEMS or items > MAX_GGUF_ITEMS:
                    raise refuse(f"metadata {key!r} is an array of {count:,} items (at most {MAX_GGUF_ARRAY_ITEMS:,} "
                                 f"in one array and {MAX_GGUF_ITEMS:,} in all; a model's vocabulary has a few "
                                 "hundred thousand)")  # fmt: skip
                if item_kind in _SCALAR_SIZES:
                    at += _SCALAR_SIZES[item_kind] * count
                elif item_kind == _STRING:
                    for _ in range(count):
                        at = string(at, f"an item of {key!r}")
                else:
                    raise refuse(f"metadata {key!r} is an array of type {item_kind}, which GGUF models do not use")
            else:
                raise refuse(f"metadata {key!r} has the unknown type {kind}")
            if at > size:
                raise refuse(f"metadata {key!r} runs past the end of the file")


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
            check_gguf_header(gguf_path, field)
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
    timeout = CONVERT_TIMEOUT_BASE_SECONDS + CONVERT_TIMEOUT_SECONDS_PER_GIB * gguf_path.stat().st_size / 2**30
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lmtuner_core.models.gguf_import", str(gguf_path), str(output_dir)],
            capture_output=True, text=True, env=env, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LmtunerError(f"{field}: converting {gguf_path} did not finish in {timeout:.0f} s", field=field) from None
    last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        outcome = json.loads(last)
    except ValueError:
        outcome = {}
    if proc.returncode == 0 and outcome.get("ok"):
        return
    if "error" in outcome:
        raise LmtunerError(f"{field}: {outcome['error']}", field=field)
    # The child's traceback names library files and GGUF internals: for the log, not for the caller.
    logger.warning("converting %s failed (exit code %s):\n%s", gguf_path, proc.returncode, proc.stderr[-5000:])
    raise LmtunerError(
        f"{field}: converting {gguf_path} failed (exit code {proc.returncode}); the converter's output is in "
        "server.log",
        field=field,
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
        first_line = (str(exc).splitlines() or ["no detail"])[0][:200]  # not the library's traceback-like tail
        raise LmtunerError(f"{gguf_path} could not be read as GGUF ({first_line})") from None
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
