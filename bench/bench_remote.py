"""Benchmark `surgery inspect URL`: bytes and requests per format against the file size, and time
against downloading the file from the same server.

What it measures
    A checkpoint of `--tensors` float32 tensors of realistic shapes (bench/_harness.py's layout:
    conv weights with their batch-norm vectors, transformer blocks), `--size-gb` in all, saved as
    torch zip, torch legacy, safetensors, and as `--shards` safetensors shards with their
    `model.safetensors.index.json`, in a temporary folder (about 4 x `--size-gb` of disk; removed
    at the end). A Range-capable HTTP server (Python's http.server with single-range answers,
    HTTP/1.1 keep-alive, TCP_NODELAY) serves the folder from a separate process, each answer
    delayed by a round trip of `--latency-ms` (0 and 20 by default: this machine, and a server
    some distance away) and optionally capped at `--mbit` Mbit/s.

    For each format and latency: `python -m surgery inspect URL --json` (its `remote` field gives
    the bytes and requests), and `curl -s -o /dev/null URL`, the whole file from the same server;
    one warm-up, then `--runs` timed runs each, round-robin, median wall time. Files are in the
    page cache (warm). Then, at the first latency, the torch zip and the safetensors file
    converted to safetensors from their URL (`surgery convert URL`: downloaded into TMPDIR,
    converted, the copy removed) against `curl -o FILE URL && surgery convert FILE`.

    python bench/bench_remote.py                                  # 1 GB, 400 tensors, 100 shards
    python bench/bench_remote.py --size-gb 0.2 --runs 1           # quick check

Results: a Markdown table on stdout, the JSON under bench/results/remote.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import HERE, code_state, finish, layout, machine

RESULTS = HERE / "results" / "remote.json"
FILES = {
    "torch-zip": "model.pth",
    "torch-legacy": "model-legacy.pth",
    "safetensors": "model.safetensors",
    "sharded": "sharded/model.safetensors.index.json",
}


def generate(folder: Path, size_gb: float, n_tensors: int, shards: int) -> dict:
    """The state_dict in the four layouts (in a child process: this one stays without torch)."""
    import safetensors.torch
    import torch

    torch.manual_seed(0)
    sd = {name: torch.empty(shape).normal_() for name, shape in layout(n_tensors, int(size_gb * 1e9))}
    torch.save(sd, folder / FILES["torch-zip"])
    torch.save(sd, folder / FILES["torch-legacy"], _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(sd, str(folder / FILES["safetensors"]))
    (folder / "sharded").mkdir()
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        safetensors.torch.save_file({k: sd[k] for k in part}, str(folder / "sharded" / shard))
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())}, "weight_map": weight_map}
    (folder / FILES["sharded"]).write_text(json.dumps(index))
    return {
        "num_tensors": len(sd),
        "tensor_bytes": sum(t.nbytes for t in sd.values()),
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
    }


def serve(folder: Path, port_file: Path, latency_ms: float, mbit: float) -> None:
    """A Range-capable server over `folder` (child process); its port goes to `port_file`."""
    import re
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(latency_ms / 1000)
            file = folder / self.path.lstrip("/")
            if not file.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = file.stat().st_size
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            first, last = (
                (int(match[1]), min(int(match[2] or size - 1), size - 1)) if match else (0, size - 1)
            )
            self.send_response(206 if match else 200)
            if match:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            with open(file, "rb") as f:
                f.seek(first)
                left = last - first + 1
                while left:
                    chunk = f.read(min(1 << 20, left))
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    if mbit:
                        time.sleep(len(chunk) * 8 / (mbit * 1e6))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port_file.write_text(str(httpd.server_address[1]))
    httpd.serve_forever()


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return wall, proc.stdout


CONVERTED = ("torch-zip", "safetensors")  # the formats converted from a URL


def convert_row(fmt: str, url: str, out: Path, runs: int, env: dict[str, str]) -> dict:
    """`surgery convert URL` (its download streamed into TMPDIR, then the copy converted and
    removed) against the two steps it saves: `curl -o FILE URL`, then `surgery convert FILE`;
    round-robin, one warm-up. Each run starts with no output on disk."""
    out.mkdir(exist_ok=True)
    one = [sys.executable, "-m", "surgery", "convert", url, "-o", str(out / "a.safetensors")]
    two = [
        "bash",
        "-c",
        f"curl -s --fail -o {out / 'file'} {url} && "
        f"{sys.executable} -m surgery convert {out / 'file'} -o {out / 'b.safetensors'}",
    ]
    times: dict[str, list[float]] = {"one": [], "two": []}
    for run in range(runs + 1):
        for key, argv in (("one", one), ("two", two)):
            for old in out.iterdir():
                old.unlink()
            wall, _ = timed(argv, env)
            if run:
                times[key].append(wall)
    for old in out.iterdir():
        old.unlink()
    return {
        "format": fmt,
        "file_bytes": int(
            json.loads(
                subprocess.run(
                    [sys.executable, "-m", "surgery", "inspect", url, "--json"],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                ).stdout
            )["remote"]["size"]
        ),
        "convert_url_s": statistics.median(times["one"]),
        "curl_then_convert_s": statistics.median(times["two"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=400)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--latency-ms", default="0,20", help="round trips to measure at, comma-separated")
    parser.add_argument("--mbit", type=float, default=0, help="cap the server's rate (0: none)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--_generate", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._generate:
        folder, shards = Path(args._generate[0]), int(args._generate[1])
        print(json.dumps(generate(folder, args.size_gb, args.tensors, shards)))
        return 0
    if args._serve:
        serve(Path(args._serve[0]), Path(args._serve[1]), float(args._serve[2]), args.mbit)
        return 0
    if shutil.which("curl") is None:
        sys.exit("curl is needed for the full-download rows")

    folder = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    try:
        print(f"making {args.size_gb} GB x 4 layouts, {args.tensors} tensors, in {folder} ...", flush=True)
        made = subprocess.run(
            [sys.executable, __file__, "--size-gb", str(args.size_gb), "--tensors", str(args.tensors)]
            + ["--_generate", str(folder), str(args.shards)],
            capture_output=True,
            text=True,
            check=True,
        )
        facts = json.loads(made.stdout.strip().splitlines()[-1])
        sizes = {fmt: (folder / name).stat().st_size for fmt, name in FILES.items()}
        sizes["sharded"] += sum(p.stat().st_size for p in (folder / "sharded").glob("*.safetensors"))
        code = code_state()
        rows, converts = [], []
        latencies = [float(x) for x in args.latency_ms.split(",")]
        for latency in latencies:
            port_file = folder / "port"
            port_file.unlink(missing_ok=True)
            server = subprocess.Popen(
                [sys.executable, __file__, "--mbit", str(args.mbit), "--_serve", str(folder), str(port_file)]
                + [str(latency)]
            )
            try:
                while not port_file.exists() or not port_file.read_text():
                    time.sleep(0.05)
                base = f"http://127.0.0.1:{port_file.read_text()}/"
                for fmt, name in FILES.items():
                    url = base + name
                    inspect = [sys.executable, "-m", "surgery", "inspect", url, "--json"]
                    curl = ["curl", "-s", "-o", "/dev/null", "--fail", url]
                    times: dict[str, list[float]] = {"inspect": [], "download": []}
                    for run in range(args.runs + 1):  # the first is the warm-up
                        wall, out = timed(inspect, env)
                        remote = json.loads(out)["remote"]
                        if run:
                            times["inspect"].append(wall)
                        if fmt != "sharded":  # curl fetches one file; the shards are many
                            wall, _ = timed(curl, env)
                            if run:
                                times["download"].append(wall)
                    row = {
                        "format": fmt,
                        "latency_ms": latency,
                        "file_bytes": sizes[fmt],
                        "bytes_read": remote["bytes_read"],
                        "requests": remote["requests"],
                        "files": remote["files"],
                        "inspect_s": statistics.median(times["inspect"]),
                        "download_s": statistics.median(times["download"]) if times["download"] else None,
                    }
                    rows.append(row)
                    print(f"  {fmt} at {latency:g} ms: {row}", flush=True)
                    if latency == latencies[0] and fmt in CONVERTED:
                        converts.append(convert_row(fmt, url, folder / "out", args.runs, env))
                        print(f"  convert {fmt}: {converts[-1]}", flush=True)
            finally:
                server.terminate()
                server.wait()
        problems = ["surgery's code changed during the run"] if code_state() != code else []

        print()
        print(
            f"{facts['num_tensors']} float32 tensors, {facts['tensor_bytes'] / 1e9:.2f} GB; sharded: "
            f"{args.shards} shards. Server on 127.0.0.1, a separate process"
            + (f", capped at {args.mbit:g} Mbit/s" if args.mbit else "")
            + f". Median of {args.runs} runs after 1 warm-up."
        )
        print()
        print("| format | latency | file | fetched | share | requests | inspect s | full download s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            download = f"{r['download_s']:.2f}" if r["download_s"] is not None else "-"
            print(
                f"| {r['format']} | {r['latency_ms']:g} ms | {r['file_bytes'] / 2**20:,.1f} MiB "
                f"| {r['bytes_read'] / 2**10:,.1f} KiB | {100 * r['bytes_read'] / r['file_bytes']:.3f}% "
                f"| {r['requests']} | {r['inspect_s']:.2f} | {download} |"
            )
        print()
        print(f"Convert to safetensors, from the server at {latencies[0]:g} ms (median of {args.runs}):")
        print()
        print("| format | file | surgery convert URL s | curl, then surgery convert FILE s | ratio |")
        print("|---|---|---|---|---|")
        for c in converts:
            print(
                f"| {c['format']} | {c['file_bytes'] / 2**20:,.1f} MiB | {c['convert_url_s']:.2f} "
                f"| {c['curl_then_convert_s']:.2f} | {c['convert_url_s'] / c['curl_then_convert_s']:.2f} |"
            )
        RESULTS.parent.mkdir(exist_ok=True)
        doc = {
            "rows": rows,
            "converts": converts,
            "facts": facts,
            "args": vars(args),
            "code": code,
            "machine": machine(folder, facts),
            "problems": problems,
        }
        return finish(RESULTS, doc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
