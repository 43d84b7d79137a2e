"""Retrieval at scale: `itmkit index build` and `itmkit search` on a 100,000-image synthetic gallery.

    python benchmarks/retrieval_scale.py --second SCAN.safetensors --first GPO.safetensors
        [--images 100000] [--data /tmp/itmkit-bench-synth100k] [--index-types "Flat;HNSW32;IVF1024,Flat"]
        [--queries 200] [--shortlist 100]

The gallery is random: 36 x F uniform region features per image (F: the checkpoints' feature width)
and five captions of 8 to 15 random words of the checkpoints' vocabulary each, written once into
``--data`` as a precomp split. Its scores mean nothing; its sizes are those of a real gallery, which
is all timing and memory depend on. Per index type, in a fresh process each (peak memory is the
process's own maximum resident set):

- build: ``itmkit index build SECOND --first-stage FIRST --side images`` (the images only: text
  queries search them), the wall time, the index folder's size, and memory twice: the peak resident
  set (which counts the pages of memory-mapped files read, reclaimable page cache) and the peak of
  the anonymous memory the process allocated (RssAnon, sampled every 20 ms);
- query: ``--queries`` captions, each encoded by the first stage and searched for its top 10 (as
  ``itmkit search`` runs it, the index loaded once, warm), and again with the top ``--shortlist``
  re-scored by SECOND from the fragment store; the p50 / p95 latency of each, and memory as above.

Writes benchmarks/retrieval_scale_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import record, run_context

RESULTS = Path(__file__).with_name("retrieval_scale_results.json")
CAPTIONS_PER_IMAGE = 5


def write_gallery(folder: Path, images: int, checkpoint: str, seed: int = 0) -> Path:
    """A precomp split ``test`` of random features and random captions, written once."""
    from itmkit.checkpoint import load_checkpoint

    if (folder / "test_caps.txt").exists():
        return folder
    loaded = load_checkpoint(checkpoint)
    dim, regions = loaded.model.data_ports.feature_dim, 36
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    features = np.lib.format.open_memmap(tmp / "test_ims.npy", mode="w+", dtype=np.float32,
                                         shape=(images, regions, dim))
    for start in range(0, images, 5000):
        stop = min(start + 5000, images)
        features[start:stop] = rng.random((stop - start, regions, dim), dtype=np.float32)
    features.flush()
    del features
    words = [w for w in loaded.vocab.idx2word[4:] if w.isalpha()]
    lengths = rng.integers(8, 16, size=images * CAPTIONS_PER_IMAGE)
    picks = rng.integers(0, len(words), size=int(lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    with open(tmp / "test_caps.txt", "w") as f:
        for c in range(len(lengths)):
            f.write(" ".join(words[i] for i in picks[bounds[c]:bounds[c + 1]]) + "\n")
    loaded.vocab.save(tmp / "vocab.json")
    os.replace(tmp, folder)
    return folder


def in_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last; add its peak RSS (MB)."""
    wrapper = ("import json, sys\nresult = {}\n" + ANON_SAMPLER + code +
               "\nresult['peak_rss_mb'] = round(peak_rss_kb() / 1024)"
               "\nresult['peak_anon_mb'] = round(peak_anon[0] / 1024)"
               "\nprint(json.dumps(result))\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The resident set (VmHWM) counts the pages of memory-mapped files (the features, the stores) that were read:
# page cache the kernel takes back when memory is short. What the process itself allocates is its
# anonymous memory (RssAnon), which /proc reports only as a current value: a thread samples it.
ANON_SAMPLER = """
import threading, time
peak_anon = [0]
def _sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=_sample, daemon=True).start()

def peak_rss_kb():
    # VmHWM: this process's own peak. (getrusage's ru_maxrss is not: Linux carries it over exec from the
    # forked copy of the parent, so a child started after the parent mapped the gallery reported its size.)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

BUILD = """
import time
from itmkit.cli import app
second, first, data, out, spec = sys.argv[1:6]
args = ["index", "build", second, "--first-stage", first, "--data", data, "--split", "test", "--side", "images",
        "-o", out, "--index-type", spec, "--device", "cpu", "--force"]
if len(sys.argv) > 6:
    args += ["--search-params", sys.argv[6]]
start = time.perf_counter()
try:
    app(args)
except SystemExit as exc:
    if exc.code:
        raise
result["seconds"] = time.perf_counter() - start
"""

QUERY = """
import time
import numpy as np
from itmkit.index import Index, search
from itmkit.retrieval_cli import _checkpoint
from itmkit.index import encode_query_text
from itmkit.twostage import unit_vectors
folder, data, queries, shortlist = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
index = Index(folder)
first = _checkpoint(index.manifest["first_stage"]["path"], "cpu")
second = _checkpoint(index.manifest["model"]["path"], "cpu")
index.faiss("images")
result["load_seconds"] = time.perf_counter() - start
captions = open(data + "/test_caps.txt").read().splitlines()[:queries + 10]

def first_stage(text):
    return search(index, unit_vectors(encode_query_text(first, text, "cpu"))[0], "images", 10)

def two_stage(text):
    vector = unit_vectors(encode_query_text(first, text, "cpu"))[0]
    rescorer = (second.model, encode_query_text(second, text, "cpu"), "text")
    return search(index, vector, "images", 10, shortlist=shortlist, rescorer=rescorer)

for name, fn in (("first_stage", first_stage), ("rescored", two_stage)):
    for text in captions[:10]:
        fn(text)  # warm
    times = []
    for text in captions[10:]:
        t0 = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - t0)
    result[name] = {"p50_ms": 1000 * float(np.percentile(times, 50)), "p95_ms": 1000 * float(np.percentile(times, 95))}
"""


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--second", required=True, help="the re-scoring checkpoint (SCAN t-i)")
    parser.add_argument("--first", required=True, help="the first stage (GPO, VSE++)")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--data", default="/tmp/itmkit-bench-synth100k")
    parser.add_argument("--work", default="/tmp/itmkit-bench-indexes", help="where the indexes are built")
    parser.add_argument("--index-types", default="Flat;HNSW32;IVF1024,Flat", help="';'-separated factory strings")
    parser.add_argument("--search-params", default=";efSearch=64;nprobe=32", help="';'-separated, one per type")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--name", default="synthetic_100k")
    args = parser.parse_args(argv)

    data = write_gallery(Path(args.data), args.images, args.first)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = []
    for spec, params in zip(args.index_types.split(";"), args.search_params.split(";")):
        out = work / spec.replace(",", "_")
        built = in_child(BUILD, args.second, args.first, str(data), str(out), spec, *([params] if params else []))
        queried = in_child(QUERY, str(out), str(data), str(args.queries), str(args.shortlist))
        row = {"index_type": spec, "search_params": params or None,
               "build_seconds": round(built["seconds"], 1), "build_peak_rss_mb": built["peak_rss_mb"],
               "build_peak_anon_mb": built["peak_anon_mb"],
               "index_mb": round(folder_mb(out)), "faiss_mb": round((out / "images.faiss").stat().st_size / 2**20),
               "load_seconds": round(queried["load_seconds"], 2), "query_peak_rss_mb": queried["peak_rss_mb"],
               "query_peak_anon_mb": queried["peak_anon_mb"],
               "first_stage_ms": {k: round(v, 2) for k, v in queried["first_stage"].items()},
               "rescored_ms": {k: round(v, 2) for k, v in queried["rescored"].items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "gallery": f"{args.images} random images (36 regions) x {CAPTIONS_PER_IMAGE * args.images} random captions;"
                   " images indexed",
        "second_stage": args.second, "first_stage": args.first,
        "queries": args.queries, "k": 10, "shortlist": args.shortlist, "rows": rows,
        **run_context(load_before),
    }
    record(RESULTS, args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
