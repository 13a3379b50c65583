"""The CUDA kernels' test programs run without a GPU (#21).

Every `crates/kernels/cuda/tests/*_test.cu` checks its kernels against a CPU reference on random inputs (and
batch invariance, bitwise, where the kernel promises it). On the GPU machine scripts/cuda-kernel-tests.sh builds
them with nvcc; here they are built with g++ against crates/kernels/cuda/emu/cuda_emu.h, which runs each thread
block as fibers on the host (barriers and warp shuffles included), so the kernels' arithmetic is checked in CI.
The only rewriting is of launches, which C++ cannot parse: `kernel<<<grid, block, smem, stream>>>(args);` becomes
`emu::launch(dim3(grid), dim3(block), [&] { kernel(args); });`. The programs skip their benchmarks under
emulation (MLX_SERVING_EMU).

usage: python tests/cuda_emu.py [NAME_test ...]     (default: every test program)
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "crates/kernels/cuda"


def balanced(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_}{close} at {start}")


def top_level_split(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def rewrite_launches(src: str) -> str:
    out = src
    while (at := out.find("<<<")) >= 0:
        # The kernel: an identifier, maybe with template arguments, just before <<< (spaces allowed).
        start = at
        while out[start - 1].isspace():
            start -= 1
        if out[start - 1] == ">":
            depth = 0
            while True:
                start -= 1
                depth += {">": 1, "<": -1}.get(out[start], 0)
                if depth == 0:
                    break
        while start > 0 and (out[start - 1].isalnum() or out[start - 1] in "_:"):
            start -= 1
        kernel = out[start:at].rstrip()
        cfg_end = out.index(">>>", at)
        cfg = top_level_split(out[at + 3 : cfg_end])
        args_end = balanced(out, cfg_end + 3, "(", ")")
        args = out[cfg_end + 3 : args_end]
        call = f"emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), [&] {{ {kernel}{args}; }})"
        out = out[:start] + call + out[args_end:]
    return out


def main() -> int:
    wanted = set(sys.argv[1:])
    tests = sorted(p for p in (KERNELS / "tests").glob("*_test.cu") if not wanted or p.stem in wanted)
    if not tests:
        print("cuda_emu: no test programs matched", file=sys.stderr)
        return 2
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = pathlib.Path(tmp) / "cuda"
        shutil.copytree(KERNELS, tree)
        for f in list(tree.rglob("*.cu")) + list(tree.rglob("*.cuh")):
            f.write_text(rewrite_launches(f.read_text()))
        for t in tests:
            exe = pathlib.Path(tmp) / t.stem
            src = tree / "tests" / t.name
            print(f"== {t.relative_to(ROOT)} (host emulation)", flush=True)
            cmd = ["g++", "-std=c++17", "-O2", "-fno-strict-aliasing", "-w", "-I", str(tree / "emu"), "-include", "cuda_emu.h", "-x", "c++",
                   str(src), "-o", str(exe)]
            build = subprocess.run(cmd, capture_output=True, text=True)
            if build.returncode != 0:
                print(build.stdout + build.stderr)
                failed.append(t.stem + " (build)")
                continue
            run = subprocess.run([str(exe)], timeout=1200)
            if run.returncode != 0:
                failed.append(t.stem)
    if failed:
        print("cuda_emu: FAILED: " + ", ".join(failed))
        return 1
    print(f"cuda_emu: {len(tests)} kernel test program(s) passed under host emulation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
