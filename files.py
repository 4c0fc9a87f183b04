"""Every file this project reads or writes that is not a data set: the one atomic writer, JSON read safely, the
lock that makes one process the writer of a folder, checkpoint files (safetensors read and written by hand, pickled
weights read as tensors only, a sharded index) and the Hub download into a cache.

Nothing read here runs code or writes outside its folder; a file that cannot be used is a LoadError whose message, one
line, names it (tests/README.md, "Faults and bad input").
"""
import contextlib
import fcntl
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import socket
import time
from pathlib import Path

import requests
import torch


class LoadError(ValueError):
    """A model, tokenizer, download or folder that cannot be used; the message, one line, names the file, folder or
    repository and the problem."""


def read_json(text):
    """json.loads with every way it fails a ValueError: invalid JSON and an integer of over 4300 digits are, nesting
    too deep for Python's recursion limit is a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def atomic_write(path, content):
    """Write `content` (bytes, or a function that writes into a binary file) to path.tmp, then rename it over path:
    a killed writer leaves the old file or the new one, never half of one. The project's one writer of files. The
    .tmp is made afresh, so a .tmp left in a copied folder (a link to a file elsewhere, say) is never written
    through; a failure (a full disk, a read-only folder) is an OSError naming `path`."""
    tmp = Path(f"{path}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            content(f) if callable(content) else f.write(content)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, e.strerror, str(path)) from None


# --------------------------------------------------------------------------------------------------------------------
# One writer per folder

HELD = {}  # lock file -> its open file: the locks this process holds


def hold(path, what):
    """Make this process the one writer of `what` (a run folder, a teacher cache) with an exclusive flock on the file
    `path`, which then names the holder: pid, host and start. The kernel releases a flock when its process ends,
    however it ends, so a crashed run blocks nothing. Held by this process already: nothing to do (a run's phases, a
    test, come back to a folder). Held by another: LoadError naming `what` and the holder."""
    path = os.path.realpath(path)
    if path in HELD:
        return
    # not through a link: a copied folder's lock file could point at a file to overwrite
    handle = open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = handle.read().strip() or "another process"
        handle.close()
        raise LoadError(f"{what} is in use by {who}; wait for that process to end") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    HELD[path] = handle


def release(path):
    handle = HELD.pop(os.path.realpath(path), None)
    if handle:
        handle.close()


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint files: model.safetensors (or a sharded index, or pytorch_model.bin), under Hugging Face tensor names

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end)}} (offsets relative to the data after the header), then the
    data, which the tensors must cover exactly. Tensors are views of a copy-on-write memory map of the file."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise LoadError(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte length)")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, 100_000_000):
            raise LoadError(f"{path}: header length {n} does not fit in the file ({size} bytes)")
        try:
            header = read_json(f.read(n))
        except ValueError as e:  # UnicodeDecodeError too
            raise LoadError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise LoadError(f"{path}: header is not a JSON object")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    header.pop("__metadata__", None)
    tensors, covered = {}, []
    data_size = size - 8 - n
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise LoadError(f"{where}: expected fields dtype, shape, data_offsets, got {info!r}")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise LoadError(f"{where}: unsupported dtype {info['dtype']!r}")
        dtype, shape, offsets = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not all(isinstance(i, int) and i >= 0 for i in [*shape, *offsets]) or len(offsets) != 2:
            raise LoadError(f"{where}: shape {shape} and data_offsets {offsets} must be non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise LoadError(f"{where}: data_offsets [{begin}, {end}] point outside the data ({data_size} bytes)")
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize:
            raise LoadError(f"{where}: data_offsets span {end - begin} bytes, shape {shape} x {info['dtype']} needs "
                            f"{numel * dtype.itemsize}")
        covered.append((begin, end))
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=numel, offset=8 + n + begin).reshape(shape)
                         if numel else torch.empty(shape, dtype=dtype))
    position = 0  # the tensors must tile the data: no gaps, no overlaps, nothing left over
    for begin, end in sorted(covered):
        if begin != position:
            raise LoadError(f"{path}: data bytes {min(begin, position)}..{max(begin, position)} are not covered "
                            "exactly once by the tensors")
        position = end
    if position != data_size:
        raise LoadError(f"{path}: {data_size - position} bytes after the last tensor (file larger than its header "
                        "says)")
    return tensors


def write_safetensors(path, tensors):
    """Inverse of read_safetensors; tensors in name order, header padded with spaces to a multiple of 8 bytes."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    tensors = {name: t.detach().contiguous().cpu() for name, t in sorted(tensors.items())}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f):
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    atomic_write(path, write)


def read_checkpoint(directory):
    """({name: tensor}, {name: file it came from}) from the first of WEIGHT_FILES present in `directory`."""
    for weights in WEIGHT_FILES:
        path = directory / weights
        if not path.exists():
            continue
        files = [directory / shard for shard in parse(path, shards)] if weights.endswith(".index.json") else [path]
        tensors, origin = {}, {}
        for file in files:
            if not file.exists():
                raise LoadError(f"{file}: shard listed in {path} is missing")
            part = parse(file, read_safetensors if file.suffix == ".safetensors" else read_pickled_tensors)
            tensors.update(part)
            origin.update(dict.fromkeys(part, file))
        return tensors, origin
    raise LoadError(f"{directory}: no checkpoint found (looked for {', '.join(WEIGHT_FILES)})")


def read_pickled_tensors(path):
    """{name: tensor} of a pytorch_model.bin, unpickled with weights_only=True: tensors and plain data, never code."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusals, a zip or pickle cut short, not a checkpoint at all
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LoadError(f"{path}: not a PyTorch checkpoint of tensors ({reason})") from None
    if not (isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())):
        raise LoadError(f"{path}: not a dictionary of tensors")
    return tensors


def shards(index_path):
    """Shard file names of a sharded checkpoint, from its index's weight_map {tensor name: shard file}. A name must
    be a relative path of plain parts, so that it stays inside the checkpoint's folder: a downloaded index naming
    "../x" or "/x" would have the download write there (pip refuses such names in a wheel for the same reason)."""
    try:
        names = sorted(set(read_json(Path(index_path).read_bytes())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise LoadError(f"{index_path}: expected JSON with a weight_map of tensor name -> shard file ({e!r})") from None
    for name in names:
        if not (isinstance(name, str) and name and "\\" not in name and not name.startswith("/")
                and all(part not in ("", ".", "..") for part in name.split("/"))):
            raise LoadError(f"{index_path}: shard name {name!r} is not a relative path inside the checkpoint's folder")
    return names


def parse(path, read):
    """read(path), where a file of the download cache that fails to be read (LoadError) is moved aside to
    path.invalid, so that the next run downloads it again instead of failing on it every time (an HTML page served
    as model.safetensors, say)."""
    try:
        return read(path)
    except LoadError as e:
        if not Path(path).resolve().is_relative_to(cache_root().resolve()):
            raise
        aside = f"{path}.invalid"
        os.replace(path, aside)
        raise LoadError(f"{e}; moved aside to {aside}, the next run downloads it again") from None


# --------------------------------------------------------------------------------------------------------------------
# Hub download: {HF_ENDPOINT}/{repo}/resolve/main/{file}, cached under $TINYTHINKER_CACHE (default ~/.cache/tinythinker)

def cache_root():
    return Path(os.environ.get("TINYTHINKER_CACHE") or Path.home() / ".cache" / "tinythinker")


def resolve_model_directory(name_or_dir):
    """A local directory as is; a Hub repository id -> its cached copy (config.json and weights), fetched if needed.
    A cached copy asks the Hub nothing, except for a file moved aside (parse) or missing."""
    if Path(name_or_dir).is_dir():
        if not (Path(name_or_dir) / "config.json").is_file():
            raise LoadError(f"{Path(name_or_dir) / 'config.json'} not found")
        return Path(name_or_dir)
    repo = check_repo_id(name_or_dir)
    if hub_download(repo, "config.json") is None:
        raise LoadError(f"{repo}: not a local directory, and the Hub repository has no config.json")
    local = cache_root() / repo
    for weights in [w for w in WEIGHT_FILES if (local / w).exists()] or WEIGHT_FILES:
        path = hub_download(repo, weights)
        if path is not None:
            if weights.endswith(".index.json"):
                for shard in parse(path, shards):
                    if hub_download(repo, shard) is None:
                        raise LoadError(f"{repo}: shard {shard} listed in {weights} is not on the Hub")
            return local
    raise LoadError(f"{repo}: the Hub repository has none of {', '.join(WEIGHT_FILES)}")


REPO_PART = r"\w(?:[\w.-]*\w)?"  # letters, digits, "_", "-", "."; a letter or digit at both ends


def model_file(name_or_dir, filename):
    """Path of `filename` in a local checkpoint directory (present or not), or in a Hub repository's cached copy,
    fetched if needed."""
    if Path(name_or_dir).is_dir():
        return Path(name_or_dir) / filename
    path = hub_download(check_repo_id(name_or_dir), filename)
    if path is None:
        raise LoadError(f"{name_or_dir}: not a local directory, and the Hub repository has no {filename}")
    return path


def check_repo_id(name):
    """A Hub repository id as the Hub allows them (huggingface_hub's validate_repo_id): "name" or "owner/name" of at
    most 96 characters, no ".." or "--". So a repository is always one folder of the cache: "a/..", "../a" or
    "a/../../b" name none."""
    name = str(name)
    if not (re.fullmatch(f"({REPO_PART}/)?{REPO_PART}", name) and ".." not in name and "--" not in name
            and len(name) <= 96):
        raise LoadError(f"{name}: neither a local directory nor a Hub repository id like google/flan-t5-base")
    return name


WEIGHT_SUFFIXES = (".safetensors", ".bin")
SMALL_FILE_BYTES = 64 << 20  # config.json, spiece.model, an index: far smaller (t5-small's spiece.model is 0.8 MB)


def hub_download(repo, filename):
    """Path of `filename` from Hub repository `repo`, downloaded once into the cache; None if the repo lacks it.
    The transfer goes to a .part file; an interrupted one is resumed with a Range request for as long as each try
    makes progress. It may take no more than download_limit allows. The result is checked against the size and hash
    the Hub announces (X-Linked-Size/-Etag for LFS files, ETag = git blob sha1 otherwise), then renamed into place."""
    dest = cache_root() / repo / filename
    if dest.exists():
        return dest
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/main/{requests.utils.quote(filename)}"
    offline = (f"cannot download {url}: {{}}. If this machine is offline, fetch the model elsewhere and pass its "
               "local directory (config.json + model.safetensors or pytorch_model.bin; spiece.model for the "
               "tokenizer) instead of a repository id")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LoadError(offline.format("HF_HUB_OFFLINE=1"))
    headers = {"Accept-Encoding": "identity"}  # sizes and hashes are of the raw bytes
    if os.environ.get("HF_TOKEN"):
        headers["authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    part = Path(f"{dest}.part")
    part.parent.mkdir(parents=True, exist_ok=True)
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            with requests.get(url, headers={**headers, "Range": f"bytes={have}-"} if have else headers,
                              stream=True, timeout=60) as r:
                if r.status_code == 404:
                    return None
                if r.status_code == 416:  # a stale .part that is already complete or too long: start again
                    part.unlink()
                    continue
                if r.status_code in (401, 403):
                    raise LoadError(f"{url}: HTTP {r.status_code}; for a gated or private repository set HF_TOKEN")
                if r.status_code >= 400:
                    raise LoadError(f"{url}: HTTP {r.status_code}")
                size, digest = announced_size_and_hash(r)
                resumed = r.status_code == 206
                limit = download_limit(url, size, have if resumed else 0, part.parent)
                with open(part, "ab" if resumed else "wb") as f:
                    for chunk in r.iter_content(1 << 14):  # small: a broken connection loses the chunk in flight
                        f.write(chunk)
                        if f.tell() > limit:
                            part.unlink()
                            raise LoadError(f"{url}: the server sent more than {limit} bytes "
                                            f"({'the size it announced' if size >= 0 else 'no small file is larger'})")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if not part.exists() or part.stat().st_size == have:  # no progress: give up
                raise LoadError(offline.format(e)) from None
    verify_download(part, url, size, digest)
    os.replace(part, dest)  # not atomic_write: the .part is a resumable download, renamed once it is verified
    return dest


def download_limit(url, size, have, folder):
    """The bytes a download may reach: its announced size, which must fit on the disk beside the `have` already
    there. Weights must announce one (a body that never ends would fill the disk); a small file (config, tokenizer,
    index) that announces none is cut off past SMALL_FILE_BYTES."""
    weights = url.endswith(WEIGHT_SUFFIXES)
    if size < 0 and weights:
        raise LoadError(f"{url}: the server announces no size for these weights; refusing a download without bound")
    if size < 0:
        return SMALL_FILE_BYTES
    if not weights and size > SMALL_FILE_BYTES:
        raise LoadError(f"{url}: the server announces {size} bytes, more than a config, tokenizer or index holds")
    free = shutil.disk_usage(folder).free
    if size - have > free:
        raise LoadError(f"{url}: the server announces {size} bytes, more than {folder} can take ({free} bytes free)")
    return size


def announced_size_and_hash(r):
    """Full size (-1: none announced) and hash of the file behind a (possibly redirected, possibly partial) response."""
    def number(header):  # a count, or -1 for a header absent or garbled
        return int(header) if header and header.isdigit() else -1

    for response in (*r.history, r):
        if "X-Linked-Etag" in response.headers:  # LFS file: the Hub's answer before the redirect to storage
            return number(response.headers.get("X-Linked-Size")), response.headers["X-Linked-Etag"].strip('"')
    if r.status_code == 206:
        size = number(r.headers.get("Content-Range", "").rsplit("/", 1)[-1])
    else:
        size = number(r.headers.get("Content-Length"))
    return size, r.headers.get("ETag", "").removeprefix("W/").strip('"')


def verify_download(part, url, size, digest):
    data_size = part.stat().st_size
    problem = None
    if size >= 0 and data_size != size:
        problem = f"received {data_size} bytes, the server announced {size}"
    elif len(digest) in (40, 64):
        h = hashlib.sha256() if len(digest) == 64 else hashlib.sha1(b"blob %d\0" % data_size)
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            problem = f"content hash {h.hexdigest()} differs from the announced {digest}"
    if problem:
        part.unlink()
        raise LoadError(f"{url}: {problem}; the partial file was removed, try again")
