"""The prepared-weights cache: a quantized GGUF model as it sits in memory, kept on disk.

Loading a 4-bit GGUF file for the CPU converts it: the Q4 blocks are re-laid out for the native
kernels, the Q8_0 vocabulary becomes an int8 pass plus bf16 rows, every tensor is then copied
into one huge-page block (`inhouse.model.arena`), and the tokenizer is rebuilt from the file's
vocabulary. For SmolLM2-135M that is ~1 s of a ~3.5 s start, `import torch` being most of the
rest. So the first load writes the result here, and later starts read it back in one sequential
read straight into the huge-page block, the tokenizer being built meanwhile (the read releases
the GIL): the model comes back bit for bit as the conversion made it (tests/weights/test_prepared.py).

An entry is one directory ``<cache>/<key>/`` holding ``weights.bin`` (every tensor at its offset
in the block), ``tokenizer.json`` (the tokenizer's backend) and ``manifest.json`` (the
architecture, which module is which quantized class, each tensor's name, dtype, shape and offset,
which names share a tensor, the rest of the tokenizer's state).
The key hashes everything the result depends on: the source file (path, size, modification time,
inode), the dtype and quantize options as asked, the CPU's kernel build, torch's version and the
code of the modules that do the conversion; an entry that no longer matches is never read.

Where: ``$INHOUSE_WEIGHT_CACHE``, else ``~/.cache/inhouse/prepared``; ``INHOUSE_WEIGHT_CACHE=0``
turns the cache off. Entries are written to a temporary directory and renamed into place (never
half-written); the `MAX_ENTRIES` most recently used are kept, and models whose prepared weights
pass `MAX_BYTES` are not cached. Files are private to the user (mode 0600), like the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from inhouse.config import ModelArgs, RopeScaling
from inhouse.model.arena import aligned, huge_page_block
from inhouse.model.quant import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, RescoredOutput, _set
from inhouse.model.transformer import Transformer
from inhouse.tokenizer.hf import HFTokenizer

logger = logging.getLogger("inhouse.weights")

FORMAT = 1
MAX_ENTRIES = 4
MAX_BYTES = 8 << 30
_MODULE_CLASSES = {"Int4Linear": Int4Linear, "Int8Linear": Int8Linear, "RescoredOutput": RescoredOutput,
                   "Int4Embedding": Int4Embedding, "Int8Embedding": Int8Embedding}
# The code whose output an entry holds: a change to any of these files makes every key new.
_CODE = ("config.py", "weights/gguf.py", "weights/quants.py", "weights/loader.py", "weights/names.py",
         "weights/prepared.py", "model/quant.py", "model/native_layout.py", "model/transformer.py", "model/arena.py",
         "tokenizer/hf.py")
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.uint8,
                                                      torch.int8, torch.int32, torch.int64)}
_READ_CHUNK = 64 << 20


def cache_dir() -> Optional[Path]:
    """Where entries are kept, or None when ``INHOUSE_WEIGHT_CACHE=0`` turns the cache off."""
    env = os.environ.get("INHOUSE_WEIGHT_CACHE", "").strip()
    if env.lower() in ("0", "off", "false", "no"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "inhouse" / "prepared"


def _code_fingerprint() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _CODE:
        try:
            h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
        except OSError:
            h.update(rel.encode() + b"\0missing")
    return h.hexdigest()


def _source_id(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def entry_key(path: str, dtype: Any, quantize: Any) -> Optional[str]:
    """The key of `path` loaded with these (as asked) dtype and quantize options, or None where no
    entry can apply: the cache is off, the file cannot be read, or the native kernels cannot run
    here (only their weight layout is portable between runs). Builds nothing: an unquantized run
    must not wait for the kernels to compile."""
    from inhouse.kernels import cpu_isa, native_kernels_possible

    if cache_dir() is None or not native_kernels_possible():
        return None
    try:
        source = _source_id(path)
    except OSError:
        return None
    parts = {"format": FORMAT, "source": source, "dtype": str(dtype), "quantize": str(quantize), "isa": cpu_isa(),
             "torch": torch.__version__, "code": _code_fingerprint()}
    # <the file and options>-<everything>: entries of an older version of the file (or of the code)
    # are found by name
    same = hashlib.sha256(json.dumps([source["path"], parts["dtype"], parts["quantize"]]).encode()).hexdigest()[:12]
    return same + "-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- saving
def _module_spec(m: nn.Module) -> Optional[dict[str, Any]]:
    if type(m) is Int4Linear:
        return {"class": "Int4Linear", "in": m.in_features, "out": m.out_features}
    if type(m) is Int8Linear:
        return {"class": "Int8Linear", "in": m.in_features, "out": m.out_features, "groups": m.groups}
    if type(m) is RescoredOutput:
        return {"class": "RescoredOutput", "k": m.k, "rows": m.rows is not None}
    if type(m) in (Int4Embedding, Int8Embedding):
        return {"class": type(m).__name__, "in": m.embedding_dim, "out": m.num_embeddings,
                "dtype": str(m.dtype).removeprefix("torch.")}
    return None


def _describe(model: Transformer) -> Optional[tuple[dict, list, dict, list[torch.Tensor]]]:
    """(modules, tensors, aliases, the tensors in offset order), or None for a model this cache
    cannot rebuild (a module type of its own, a non-native quantized linear, a tensor off the CPU)."""
    with torch.device("meta"):
        skeleton = Transformer(model.args)
    plain = {name: type(m) for name, m in skeleton.named_modules()}
    modules: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        spec = _module_spec(m)
        if spec is not None:
            if type(m) in (Int4Linear, Int8Linear) and not m.native:
                return None
            modules[name] = spec
        elif plain.get(name) is not type(m):
            return None
    entries, aliases, order = [], {}, []
    first_name: dict[int, str] = {}
    off = 0
    named = [(n, t, "param") for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(n, t, "buffer") for n, t in model.named_buffers(remove_duplicate=False)]
    for name, t, kind in named:
        if id(t) in first_name:
            aliases[name] = first_name[id(t)]
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        if t.device.type != "cpu" or dtype not in _DTYPES:
            return None
        first_name[id(t)] = name
        nbytes = t.numel() * t.element_size()
        entries.append({"name": name, "kind": kind, "dtype": dtype, "shape": list(t.shape), "offset": off,
                        "nbytes": nbytes, "requires_grad": bool(t.requires_grad)})
        order.append(t)
        off += aligned(nbytes)
    return modules, entries, aliases, order


def save(key: str, model: Transformer, tokenizer: Any, *, source: str, dtype: torch.dtype, quantize: str) -> bool:
    """Write `model` (loaded from `source`) and `tokenizer` as the entry `key`. Returns whether it
    was written; any failure (no room, a read-only cache, a model this cache cannot rebuild) is
    logged and leaves no entry behind."""
    root = cache_dir()
    if root is None or not isinstance(tokenizer, HFTokenizer):
        return False
    described = _describe(model)
    if described is None:
        logger.debug("prepared weights not cached: the model has modules or tensors this cache does not rebuild")
        return False
    modules, entries, aliases, order = described
    total = entries[-1]["offset"] + aligned(entries[-1]["nbytes"]) if entries else 0
    if total > MAX_BYTES:
        logger.debug("prepared weights not cached: %.1f GB is more than %.0f GB", total / 1e9, MAX_BYTES / 1e9)
        return False
    t0 = time.perf_counter()
    tmp: Optional[str] = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(root).free < 2 * total:
            logger.info("prepared weights not cached in %s: less than %.1f GB free", root, 2 * total / 1e9)
            return False
        tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=root)
        os.chmod(tmp, 0o700)
        fd = os.open(os.path.join(tmp, "weights.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            for e, t in zip(entries, order):
                f.seek(e["offset"])
                f.write(memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy()))
            f.truncate(total)
        manifest = {"format": FORMAT, "key": key, "source": _source_id(source), "bytes": total,
                    "dtype": str(dtype).removeprefix("torch."), "quantize": quantize,
                    "args": dataclasses.asdict(model.args), "modules": modules, "tensors": entries,
                    "aliases": aliases, "tokenizer": tokenizer.state()}
        backend = manifest["tokenizer"].pop("backend_json")  # a file of its own: no JSON escaping of MBs
        fd = os.open(os.path.join(tmp, "tokenizer.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(backend)
        fd = os.open(os.path.join(tmp, "manifest.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, ensure_ascii=False)
        try:
            os.rename(tmp, root / key)
        except OSError:  # another process wrote the same entry first: keep theirs
            return False
        tmp = None
    except OSError as e:
        logger.info("prepared weights not cached in %s: %s", root, e)
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared weights cached in %s (%.0f MB, %.1f s): later starts skip converting the file "
                "(INHOUSE_WEIGHT_CACHE=0 turns this off)", root / key, total / 1e6, time.perf_counter() - t0)
    _evict(root, keep=key)
    return True


def _evict(root: Path, keep: str) -> None:
    """Remove the entries of other versions of `keep`'s file (same options), stale temporary
    directories, and all but the `MAX_ENTRIES` most recently used entries."""
    entries = []
    same_file = keep[:keep.index("-") + 1]  # the same file with the same options
    for d in root.iterdir():
        try:
            if d.name != keep and d.name.startswith(same_file):  # the file or the code changed since
                shutil.rmtree(d, ignore_errors=True)
                continue
            if d.name.startswith("."):
                if time.time() - d.stat().st_mtime > 3600:  # a write that died an hour ago
                    shutil.rmtree(d, ignore_errors=True)
                continue
            entries.append(((d / "manifest.json").stat().st_mtime, d))
        except OSError:
            continue
    entries.sort(reverse=True)
    for _, d in entries[MAX_ENTRIES:]:
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- loading
class _Entry:
    """What `load` returns: the model, its tokenizer and the options it was prepared with."""

    def __init__(self, model: Transformer, tokenizer: HFTokenizer, dtype: torch.dtype, quantize: str):
        self.model, self.tokenizer, self.dtype, self.quantize = model, tokenizer, dtype, quantize


def _model_args(d: dict[str, Any]) -> ModelArgs:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelArgs(**d)


def _build(manifest: dict[str, Any], block: torch.Tensor) -> Transformer:
    args = _model_args(manifest["args"])
    with torch.device("meta"):
        model = Transformer(args)
    for name, spec in sorted(manifest["modules"].items(), key=lambda kv: kv[0].count(".")):  # parents first
        cls = _MODULE_CLASSES[spec["class"]]
        if cls is RescoredOutput:  # its parts are set below (approx is an entry of its own)
            rows = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False) if spec["rows"] else None
            m = RescoredOutput(Int4Linear(64, 1, device=torch.device("meta"), native=False), rows, spec["k"])
        elif cls in (Int4Embedding, Int8Embedding):
            m = cls(spec["out"], spec["in"], _DTYPES[spec["dtype"]], device=torch.device("meta"))
        elif cls is Int8Linear:
            m = cls(spec["in"], spec["out"], device=torch.device("meta"), native=True, groups=spec.get("groups", False))
        else:
            m = cls(spec["in"], spec["out"], device=torch.device("meta"), native=True)
        _set(model, name, m)
    for m in model.modules():
        if type(m) is RescoredOutput:  # its sizes are its int8 pass's
            m.in_features, m.out_features = m.approx.in_features, m.approx.out_features
    objects: dict[str, torch.Tensor] = {}
    for e in manifest["tensors"]:
        t = block[e["offset"]:e["offset"] + e["nbytes"]].view(_DTYPES[e["dtype"]]).view(e["shape"])
        parent, _, leaf = e["name"].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if e["kind"] == "param":
            t = nn.Parameter(t, requires_grad=e["requires_grad"])
            setattr(owner, leaf, t)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = t
        else:
            raise ValueError(f"{e['name']} is not a buffer of the rebuilt model")
        objects[e["name"]] = t
    for name, target in manifest["aliases"].items():
        _set(model, name, objects[target])
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the entry has no tensor for {', '.join(left[:4])}")
    return model.eval()


def load(key: str, source: str) -> Optional[_Entry]:
    """The entry `key` for `source`, or None if there is none (or it cannot be used: it is then
    removed, with a warning, and the caller loads the file as usual)."""
    root = cache_dir()
    if root is None:
        return None
    d = root / key
    try:
        with open(d / "manifest.json", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return _drop(d, f"its manifest cannot be read ({e})")
    t0 = time.perf_counter()
    try:
        if manifest.get("format") != FORMAT or manifest.get("key") != key or manifest.get("source") != _source_id(source):
            return _drop(d, "it was written for another file or version")
        total = int(manifest["bytes"])
        block, view = huge_page_block(total)
        failure: list[BaseException] = []

        def read() -> None:  # file I/O releases the GIL: the tokenizer is built meanwhile
            try:
                # Fault the huge pages in first: reading into untouched ones costs ~3x as much
                # (each 2 MiB page faulted from inside the copy).
                block.zero_()
                with open(d / "weights.bin", "rb", buffering=0) as f:
                    done = 0
                    while done < total:
                        n = f.readinto(view[done:done + min(_READ_CHUNK, total - done)])
                        if not n:
                            raise ValueError(f"weights.bin ends after {done} of {total} bytes")
                        done += n
            except BaseException as e:  # handed to the main thread
                failure.append(e)

        reader = threading.Thread(target=read, name="inhouse-prepared-read", daemon=True)
        reader.start()
        try:
            with open(d / "tokenizer.json", encoding="utf-8") as f:
                backend = f.read()
            tokenizer = HFTokenizer.from_state(dict(manifest["tokenizer"], backend_json=backend))
        finally:
            reader.join()
        del view
        if failure:
            raise failure[0]
        model = _build(manifest, block)
        dtype = _DTYPES[manifest["dtype"]]
        quantize = str(manifest["quantize"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        return _drop(d, f"it cannot be read back ({e})")
    os.utime(d / "manifest.json")  # most recently used
    logger.info("loaded prepared weights from %s (%.0f MB, %.2f s)", d, total / 1e6, time.perf_counter() - t0)
    return _Entry(model, tokenizer, dtype, quantize)


def _drop(d: Path, why: str) -> None:
    logger.warning("prepared-weights cache entry %s not used: %s; loading the model file instead", d, why)
    shutil.rmtree(d, ignore_errors=True)
    return None
