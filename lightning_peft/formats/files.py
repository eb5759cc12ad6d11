"""Reading and writing files and export folders safely: atomic writes, safetensors, JSON and tokenizers.

Writing: every file the project writes goes through :func:`atomic_file`: a temporary file in the same
folder, flushed to disk (``fsync``) and renamed over the final name, so a crash never leaves a truncated
file under a final name. Export folders go through :func:`staged_directory`: written beside the
destination, then swapped in. Modes follow the umask, as for any file a program creates.

Reading: nothing here unpickles arbitrary objects: tensors are read from safetensors, or with
``torch.load(weights_only=True)`` after the zip archive's CRCs were checked. The safetensors files we
write carry a SHA-256 of their tensors in their metadata, checked on reading. A truncated or corrupt
file gives a ``ValueError`` that names it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

# files that make up a Hugging Face tokenizer (fast, slow and sentencepiece ones, chat templates)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# what our exports hold (adapter folders, and merged ones written by save_pretrained): --overwrite
# replaces a folder only if it holds nothing else, so that it never deletes a user's files
EXPORT_CONFIGS = ("adapter_config.json", "lightning_peft_config.json", "config.json")
_EXPORT_FILE = re.compile(
    r"adapter_model\.(safetensors|bin)|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|generation_config\.json|" + "|".join(re.escape(n) for n in (*EXPORT_CONFIGS, *TOKENIZER_FILES))
)
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux 3.15+): swap two paths in one atomic step


# ------------------------------------------------------------------------------------------ writing


def _fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "wb") as file:
        file.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "w", encoding="utf-8") as file:
        file.write(text)
    return Path(path)


def json_text(data: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: NaN and infinities become ``null`` (Python's default writes ``NaN``)."""
    return json.dumps(_finite_or_null(data), allow_nan=False, **kwargs)


def _finite_or_null(data: Any) -> Any:
    if isinstance(data, float):
        return data if data == data and data not in (float("inf"), float("-inf")) else None
    if isinstance(data, Mapping):
        return {k: _finite_or_null(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite_or_null(v) for v in data]
    return data


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a path (``safetensors.save_file``); on
    success the file is flushed to disk and renamed to ``path``, else deleted."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield staged
        _fsync_file(staged)
        os.replace(staged, out)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _fsync_directory(out.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it is flushed to disk and renamed
    to ``path`` (replacing it), else deleted. Readers see the old file or the new one, never a part.

    The file is created with mode ``0o666`` less the umask, like any file ``open`` creates.

    Example::

        with atomic_file("metrics.json", "w", encoding="utf-8") as f:
            f.write(text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as staged:
        handle = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(handle, mode, encoding=encoding, newline="" if mode == "w" else None) as file:
            yield file


def _fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A new folder next to ``out_dir`` to write into; it becomes ``out_dir`` only if the block succeeds.

    - One export at a time per ``out_dir``: a second one fails at once with ``FileExistsError`` (a lock
      file ``.<name>.lock`` beside it, held with ``flock``, so a killed export never leaves it locked).
    - An existing ``out_dir`` is refused unless ``overwrite``; even then only a folder that holds
      nothing but files our exports write (adapter, model, config and tokenizer files) is replaced.
    - The new folder is flushed to disk and swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` on
      Linux, so a crash at any point leaves ``out_dir`` as the old complete folder or the new one (elsewhere:
      two renames; a crash between them is repaired by the next export).
    - Leftovers of an interrupted export (``.<name>.partial-*``, ``.<name>.old-*``) are removed by the
      next export to the same place, with a warning that names them.

    If the block raises (or is interrupted), the staged folder is deleted and ``out_dir`` is left as it was.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _export_lock(out):
        _recover_leftovers(out)
        _check_replaceable(out, overwrite)  # before the (maybe long) writing, and again before the swap
        staged = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
        os.mkdir(staged, 0o777)  # the umask decides, as for any folder (mkdtemp would make it 0700)
        try:
            yield staged
            _fsync_tree(staged)
            _check_replaceable(out, overwrite)
            _swap_in(staged, out)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


@contextlib.contextmanager
def _export_lock(out: Path) -> Iterator[None]:
    lock = out.with_name(f".{out.name}.lock")
    busy = FileExistsError(
        f"another export to {out} is running (it holds {lock}); wait for it to finish, or choose another "
        "output path"
    )
    try:
        import fcntl
    except ImportError:  # no flock (Windows): an exclusive create; a crash leaves the file to delete
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise busy from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
        return
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise busy from None
        # the export that held it may have deleted the file meanwhile: hold a lock on the current one
        try:
            current = os.path.samestat(os.fstat(handle), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(handle)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # deleted while held, so no other export holds a lock on it
        os.close(handle)


def _leftovers(out: Path, kind: str) -> list[Path]:
    prefix = f".{out.name}.{kind}-"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _recover_leftovers(out: Path) -> None:
    """Under the lock no export is writing: folders staged beside ``out`` were left by one that died."""
    old = _leftovers(out, "old")
    restored = None
    if old and not out.exists():  # died between the two renames of a swap: put the old export back
        restored = old.pop()
        restored.rename(out)
    stale = [*_leftovers(out, "partial"), *old]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if restored is not None or stale:
        done = [f"restored {out} from {restored.name}"] if restored is not None else []
        if stale:
            done.append(f"removed {', '.join(p.name for p in stale)}")
        warnings.warn(f"an earlier export to {out} was interrupted: {'; '.join(done)}", stacklevel=4)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    if not overwrite:
        raise FileExistsError(f"{out} exists already; pass overwrite=True (--overwrite) to replace it")
    entries = sorted(out.iterdir())
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if not _is_export_file(p)]
    if foreign or (entries and not any(p.name in EXPORT_CONFIGS for p in entries)):
        held = ", ".join((foreign or [p.name for p in entries])[:10])
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise FileExistsError(
            f"{out} is not a folder that lightning_peft exported, so overwrite does not replace it: it holds "
            f"{held}{more}; delete it yourself or choose another output path"
        )


def _is_export_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and _EXPORT_FILE.fullmatch(path.name) is not None


def _fsync_tree(folder: Path) -> None:
    """Flush every file written into ``folder`` (by us, save_pretrained or a tokenizer) before it is
    renamed into place, so the rename never publishes files whose data are still in memory only."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_directory(sub)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # not on this file system
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(staged: Path, out: Path) -> None:
    if not out.exists():
        staged.rename(out)
    elif _exchange(staged, out):  # out is the new folder now, staged the old one
        shutil.rmtree(staged, ignore_errors=True)
    else:
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        try:
            staged.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(out.parent)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def write_text_staged(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`).

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError``.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists already; pass overwrite=True (--overwrite) to replace it")
    return write_text(out, text)


def write_json(data: Mapping[str, Any], path: Path) -> None:
    write_text(path, json_text(data, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(source: Any, out_dir: Path) -> list[str]:
    """Put a tokenizer into ``out_dir``: from an object with ``save_pretrained`` or a folder's tokenizer
    files. Returns the names written (empty if ``source`` holds no tokenizer)."""
    if source is None:
        return []
    if callable(getattr(source, "save_pretrained", None)):
        before = {p.name for p in out_dir.iterdir()}
        source.save_pretrained(str(out_dir))
        return sorted(p.name for p in out_dir.iterdir() if p.name not in before)
    folder = Path(source)
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out_dir / name)
            copied.append(name)
    return copied
