#!/usr/bin/env python3
"""Build llama.cpp's own server, `llama-server`, once, from the llama.cpp
source that the pinned `llama-cpp-python` source package vendors (the same
llama.cpp benches/bench.py measures in process), and print its path.

    python3 benches/llama_server.py          # builds on first use (~10 min on 2 cores), then cached

pip fetches the source package (`pip download --no-binary`) and cmake and
ninja (`pip install --target`, into the cache, so nothing is installed
system-wide). The build is CPU-only, native to this machine, without HTTPS,
the prebuilt web UI or anything else that would reach the network, and lands
in bench-results/llama-server-<version>/ (git-ignored).
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = next(
    line.split("==")[1].strip()
    for line in (ROOT / "benches" / "requirements.txt").read_text().splitlines()
    if line.startswith("llama-cpp-python==")
)
CACHE = ROOT / "bench-results" / f"llama-server-{VERSION}"
BINARY = CACHE / "build" / "bin" / "llama-server"


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_llama_server():
    """The path of a built llama-server, building it first if needed."""
    if BINARY.exists():
        return BINARY
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist_dir = CACHE / "sdist"
    if not any(sdist_dir.glob("*.tar.gz")):
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
             "--no-binary", "llama-cpp-python", "-d", sdist_dir])
    source = CACHE / "source"
    if not (source / "CMakeLists.txt").exists():
        archive = next(sdist_dir.glob("*.tar.gz"))
        prefix = f"{archive.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(source, members=members, filter="data")
    tools = CACHE / "tools"
    if not (tools / "bin" / "cmake").exists():
        run([sys.executable, "-m", "pip", "install", "--quiet", "--target", tools, "cmake", "ninja"])
    env = dict(os.environ, PYTHONPATH=str(tools), PATH=f"{tools / 'bin'}:{os.environ['PATH']}")
    cmake = tools / "bin" / "cmake"
    run([cmake, "-S", source, "-B", CACHE / "build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"], env=env)
    run([cmake, "--build", CACHE / "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)], env=env)
    if not BINARY.exists():
        sys.exit(f"the build finished without {BINARY}")
    return BINARY


if __name__ == "__main__":
    print(ensure_llama_server())
