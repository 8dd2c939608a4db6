"""Compile every Triton kernel configuration the ops launch for a GPU architecture, without a GPU.

Triton's interpreter (how the tests run the kernels on a CPU) executes the kernels' Python, not the compiler: a
kernel can pass every interpreter test and still fail to compile, need more shared memory than a GPU has, or
spill registers. This tool runs the ops' real launchers on CPU tensors with every kernel replaced by a recorder
(as on a GPU of the target's compute capability, which some launch settings follow),
binds and specialises each launch's arguments as Triton does at run time (unit strides become constants, 16-byte
alignments attributes), then
compiles each distinct configuration for the target (Triton's bundled ptxas, no driver) and reports its shared
memory, registers, how many of its programs an SM holds at once (by those and its warps), spills, the size of its
longest loop in SASS (instructions and local-memory accesses per thread and iteration: for a token loop, the cost
of one tile) and ptxas's performance advisories (C7515: wgmma serialised). It fails (exit 1) when a configuration
does not compile or needs more shared memory than the target's limit.

usage: python benchmarks/compile_check.py [--arch 90] [--quick] [--kernels NAME,...] [--dtypes fp32,...]
       [--dims 64,...] [--precision highest|high] [--out FILE]

Run it without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler). ``--quick``: bf16 and d = 64
only; ``--kernels``: only the kernels whose name contains one of these parts; ``--precision high``: fp32 inputs
with TF32 dots (as under ``torch.set_float32_matmul_precision("high")``) instead of IEEE ones.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# largest dynamic shared memory per block (bytes) of the architectures this project meets
SHARED_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}
# per SM (CUDA's occupancy tables): shared memory (bytes), warps and blocks; every one of them has 65,536 registers,
# allocated per warp in units of 256, and reserves 1 KB of shared memory per block (compute capability 8.0 and up)
SM_LIMITS = {75: (65536, 32, 16), 80: (167936, 64, 32), 86: (102400, 48, 16), 89: (102400, 48, 24),
             90: (233472, 64, 32)}


def programs_per_sm(registers: int, warps: int, shared: int, arch: int) -> int | None:
    """How many programs (blocks) of a kernel an SM of compute capability ``arch`` holds at once, limited by its
    registers, shared memory, warps and blocks; None for an architecture without a table.

    The chunked passes launch 4 programs per SM (``_chunks``): a kernel an SM holds 3 of runs them in two rounds,
    the second a third full, where 1, 2 or 4 divide them evenly."""
    if arch not in SM_LIMITS or registers is None:
        return None
    shared_per_sm, max_warps, max_blocks = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65536 // per_warp // warps
    by_shared = shared_per_sm // (shared + (1024 if arch >= 80 else 0))
    return min(by_registers, by_shared, max_warps // warps, max_blocks)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching it."""

    def __init__(self, name: str, kernel, calls: list):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, self.kernel, args, kwargs))
        return launch


def record_launches(quick: bool, dims=None, dtypes=None, arch: int = 90) -> list:
    """Run the ops' launchers (forward and backward of every op and path) with recording kernels, as on a GPU of
    compute capability ``arch`` (the launchers choose some launch settings by it); ``dims`` and ``dtypes`` override
    the head widths and input dtypes."""
    from mirrorla.ops import triton_linear_attention as tla
    from mirrorla.ops import triton_reflect

    calls: list = []
    kernels = [(module, name, value) for module in (tla, triton_reflect) for name, value in list(vars(module).items())
               if name.endswith("_kernel")]
    for module, name, value in kernels:
        setattr(module, name, _Recorder(name, value, calls))
    capability, tla._CPU_CAPABILITY = tla._CPU_CAPABILITY, divmod(arch, 10)
    try:
        _run_launchers(tla, triton_reflect, quick, dims, dtypes)
    finally:  # the modules get their kernels back (a second recording, or a launch after it, finds real kernels)
        for module, name, value in kernels:
            setattr(module, name, value)
        tla._CPU_CAPABILITY = capability
    return calls


def _run_launchers(tla, triton_reflect, quick: bool, dims, dtypes) -> None:
    dtypes = dtypes or ([torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32])
    dims = dims or ([64] if quick else [16, 48, 64, 128])
    lengths = [197, 4096]  # the row kernels (short rows) and the chunked ones
    for dtype in dtypes:
        for d in dims:
            for n in lengths:
                b, h = 2, 3
                qkv = torch.randn(b, n, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)  # strided views, as the layers make them
                grad = torch.randn(b, h, n, d).to(dtype)
                theta, gamma = torch.randn(h, d // 2), torch.randn(h, d // 2)
                for pairing in (0, 1):
                    # inference forward (no moment), then the training forward and its backward
                    tla._mirror_forward_impl(q, k, v, theta, gamma, pairing, 0, 1e-6, 1e-6, False)
                    out, state, sums, cos, ssin = tla._mirror_forward_impl(q, k, v, theta, gamma, pairing, 0, 1e-6,
                                                                           1e-6, True)
                    tla._mirror_backward_impl(q, k, v, theta, gamma, state, sums, cos, ssin, grad, pairing, 0, 1e-6,
                                              1e-6)
                angle = torch.randn(b, h, d // 2)
                tla._fused_forward_impl(q, k, v, angle, 2, 0, 1e-6, False)
                for feature, a in ((0, None), (1, None), (2, angle)):
                    _, state = tla._fused_forward_impl(q, k, v, a, feature, 0, 1e-6, True)
                    tla._fused_backward_impl(q, k, v, a, state, grad, feature, 0, 1e-6)
        for c in (192, 768):
            w, bias, u = torch.randn(3 * c, c).to(dtype), torch.randn(3 * c).to(dtype), torch.randn(c)
            signs = torch.ones(64)
            triton_reflect._fold_forward(w, bias, u, signs, 2)
            triton_reflect._fold_backward(w, bias, w, bias, u, signs, 2, True)
            if dtype == torch.float32:  # under autocast: fp32 parameters folded into 16-bit weights, and back
                for half in (torch.bfloat16, torch.float16):
                    triton_reflect._fold_forward(w, bias, u, signs, 2, half)
                    triton_reflect._fold_backward(w.to(half), bias.to(half), w, bias, u, signs, 2, True)


def _runtime_binder(kernel, arch: int):
    """Triton's own argument binder for ``kernel`` on the target: the function ``JITFunction.run`` calls to turn a
    launch's arguments into the compiled variant's key."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def distinct_configurations(calls: list, arch: int = 90) -> dict:
    """{(kernel name, specialisation, warps, stages): (kernel, signature, constants, attributes)}: one entry per
    variant Triton compiles at run time.

    The arguments are bound and specialised as ``JITFunction.run`` does on a GPU: an int equal to 1 (a unit stride)
    becomes a constant, and pointers aligned to 16 bytes and ints divisible by 16 carry that as an attribute. Without
    that, the compiled code is a generic variant a GPU never runs (its loads along a unit stride not vectorised, its
    address arithmetic and registers inflated)."""
    configs = {}
    binders: dict = {}
    for name, kernel, args, kwargs in calls:
        if name not in binders:
            binders[name] = _runtime_binder(kernel, arch)
        backend, binder = binders[name]
        bound, specialization, options = binder(*args, **kwargs)
        warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
        key = (name, str(specialization), warps, stages)
        if key in configs:
            continue
        _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        configs[key] = (kernel, signature, constexprs, attrs)
    return configs


def size_dependent_variants(calls: list, arch: int = 90, values=(1, 48, 1001)) -> list[str]:
    """The launches whose sizes (integer arguments other than strides: token, head and tile counts) select the
    compiled variant, each as "kernel: size = value". This tool compiles the variants of the sizes it records, so
    a variant chosen by size (Triton specialises an integer equal to 1 or divisible by 16) could run on a GPU
    unchecked: a one-tile chunk on a large GPU, one head. The kernels leave their sizes unspecialised
    (``sizes_jit``), so this list is empty."""
    import inspect

    known = set(distinct_configurations(calls, arch))
    found = []
    for name, kernel, args, kwargs in calls:
        params = list(inspect.signature(kernel.fn).parameters)
        sizes = [i for i, a in enumerate(args)
                 if isinstance(a, int) and not isinstance(a, bool) and not params[i].startswith("s_")]
        for value in values:
            changed = tuple(value if i in sizes else a for i, a in enumerate(args))
            if not set(distinct_configurations([(name, kernel, changed, kwargs)], arch)) <= known:
                found.append(f"{name}: sizes = {value}")
    return sorted(set(found))


def compile_one(kernel, signature: dict, constexprs: dict, attrs: dict, warps: int, stages: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = tools / "ptxas"
    registers = spills = advisories = None
    if ptxas.exists():
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        try:
            report = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", f.name,
                                     "-o", os.devnull], capture_output=True, text=True).stderr
        finally:
            os.unlink(f.name)
        found = re.search(r"Used (\d+) registers", report)
        registers = int(found.group(1)) if found else None
        spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", report))
        advisories = ptxas_advisories(report)
    sass = _disassemble(compiled.asm["cubin"], tools / "nvdisasm")
    loop, local = _hot_loop(sass) if sass is not None else (None, None)
    uninitialised = uninitialised_uniform_reads(sass) if sass is not None else None
    return {"shared": compiled.metadata.shared, "registers": registers, "spill_stores": spills, "loop": loop,
            "loop_local": local, "uninitialised": uninitialised, "advisories": advisories}


def ptxas_advisories(report: str) -> list[str]:
    """The codes of the "Potential Performance Loss" advisories in ptxas's ``-v`` report, sorted. C7515 and its
    kin (C7508–C7520) say that ptxas serialised the kernel's wgmma instructions: each waits for the one before it
    to finish, so the tensor cores' latency adds up tile after tile. MirrorLA's chunked q pass has C7515 on sm_90
    (its last product, d angle's, stays in flight across the loop's back edge), see ``_dq_tiles``."""
    return sorted(set(re.findall(r"\((C\d+)\) Potential Performance Loss", report)))


def _dtype_label(signature: dict) -> str:
    """The report's dtype of a configuration: its first 16-bit data (else fp32). For the fold kernels (weights ``W``)
    the weights' dtype, and where autocast hands the projection another, ``fp32→bf16`` (the folded weights, ``OUT_W``)
    or ``fp32, bf16 grads`` (their gradients, ``GW``)."""
    pointers = {name: t[1:] for name, t in signature.items() if t.startswith("*")}
    if "W" in pointers:
        weights = pointers["W"]
        if pointers.get("OUT_W", weights) != weights:
            return f"{weights}→{pointers['OUT_W']}"
        if pointers.get("GW", weights) != weights:
            return f"{weights}, {pointers['GW']} grads"
        return weights
    return next((t for t in pointers.values() if t != "fp32"), "fp32")


def _shown(value) -> str:
    return "" if value is None else "–" if value == 0 else str(value)


def _disassemble(cubin: bytes, nvdisasm: Path) -> str | None:
    """The cubin's SASS as nvdisasm prints it; None without nvdisasm."""
    if not nvdisasm.exists():
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def _instructions(sass: str):
    """(address, instruction text without its predicate guard) per SASS instruction, in layout order, and the
    labels {name: index of the instruction they mark}."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if found:
            instructions.append((found.group(1), found.group(2)))
    return instructions, labels


def _hot_loop(sass: str) -> tuple[int, int]:
    """(instructions, local-memory loads and stores) of the kernel's longest loop in its SASS, per thread and
    iteration: for the token loops, the cost of one tile. A loop the compiler unrolled away (one tile per program)
    counts as no loop."""
    instructions, labels = _instructions(sass)
    texts = [text for _, text in instructions]
    longest = []
    for end, text in enumerate(texts):
        target = re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", text)
        start = labels.get(target.group(1)) if target else None
        if start is not None and start <= end and end + 1 - start > len(longest):
            longest = texts[start:end + 1]
    if len(longest) < 2:  # a branch to itself: the trap loop every kernel ends with
        return 0, 0
    return len(longest), sum(1 for text in longest if re.search(r"\b(LDL|STL)\b", text))


# SASS instructions whose first operand is read, not written
_NO_DESTINATION = ("ST", "STS", "STG", "STL", "STSM", "RED", "REDG", "ATOMS", "BAR", "MEMBAR", "FENCE", "BRA", "BRX",
                   "EXIT", "RET", "CALL", "BSSY", "BSYNC", "WARPSYNC", "NOP", "DEPBAR", "ERRBAR", "CCTL", "YIELD",
                   "WARPGROUP", "SYNCS", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "USTS")


def _uniform_registers(operand: str, pair: bool) -> list[int]:
    """The uniform registers an operand names: ``UR4`` (``UR4:UR5`` when ``pair``, a 64-bit value outside a memory
    address), ``desc[UR4]`` (a 64-bit memory descriptor, ``UR4:UR5``)."""
    found = []
    pair = pair and "[" not in operand  # an address inside [...] is 32 bits whatever the data's width
    for match in re.finditer(r"(desc\[)?\bUR(\d+)(\.64)?\b", operand):
        n = int(match.group(2))
        found += [n, n + 1] if pair or match.group(1) or match.group(3) else [n]
    return found


def uninitialised_uniform_reads(sass: str) -> list[tuple[str, str, str]]:
    """(address, register, instruction) for each read of a uniform register that no instruction before it (in the
    kernel's layout order) writes: a miscompile. The ptxas of CUDA 12.8 (Triton 3.6) built a wgmma shared-memory
    descriptor from such a register in a state kernel unrolled to one tile, which read shared memory out of bounds
    on an H200 (compute-sanitizer), an error that neither the interpreter nor ptxas reports.

    Uniform registers (``UR``) hold the wgmma descriptors and the kernel's uniform addresses. A value a loop
    carries is written before the loop, so layout order is a safe stand-in for "written on every path before"
    here. The registers an instruction implies are counted: ``.64`` pairs, a ``.WIDE`` result's pair,
    ``desc[URn]`` pairs, and a wgmma's ``gdesc[URn]`` (``URn+2:URn+3``, the B descriptor, and ``URn:URn+1`` too
    when A comes from shared memory)."""
    written: set[int] = set()
    found = []
    for address, text in _instructions(sass)[0]:
        text = re.sub(r"^@!?U?P(?:T|\d+)\s+", "", text)  # the guard predicate
        opcode, _, rest = text.partition(" ")
        operands = [part.strip() for part in rest.split(",")] if rest else []
        base = opcode.split(".")[0]
        pair = ".64" in opcode  # 64-bit operands: register pairs
        reads, writes = [], []
        for i, operand in enumerate(operands):
            descriptor = re.search(r"gdesc\[UR(\d+)\]", operand)
            if descriptor:
                n = int(descriptor.group(1))
                a_in_registers = i > 0 and re.match(r"R\d+$", operands[i - 1])
                reads += [n + 2, n + 3] if a_in_registers else [n, n + 1, n + 2, n + 3]
            elif i == 0 and not operand.startswith("[") and base not in _NO_DESTINATION \
                    and not base.startswith("HGMMA"):
                writes += _uniform_registers(operand, pair or ".WIDE" in opcode)  # .WIDE: a 64-bit result
            else:
                reads += _uniform_registers(operand, pair)
        found += [(address, f"UR{r}", text) for r in dict.fromkeys(reads) if r not in written]
        written.update(writes)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability × 10 (default 90: H100)")
    p.add_argument("--quick", action="store_true", help="bf16 and d = 64 only")
    p.add_argument("--kernels", default="", help="comma-separated parts of kernel names to compile (default: all)")
    p.add_argument("--dtypes", default="", help="comma-separated input dtypes (bf16, fp16, fp32; default: all)")
    p.add_argument("--dims", default="", help="comma-separated head widths (default: 16, 48, 64, 128)")
    p.add_argument("--precision", default="highest", choices=("highest", "high", "medium"),
                   help="torch.set_float32_matmul_precision while recording: fp32 inputs take IEEE dots at "
                        "'highest' (the default), TF32 otherwise")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    wanted_dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    if args.dtypes and (not wanted_dtypes or any(x not in names for x in wanted_dtypes)):
        print(f"compile_check: --dtypes takes {', '.join(names)}, got {args.dtypes!r}", file=sys.stderr)
        return 2
    dtypes = [names[x] for x in wanted_dtypes] or None
    try:
        dims = [int(x) for x in args.dims.split(",") if x.strip()] or None
    except ValueError:
        dims = [0]
    if dims is not None and any(not 2 <= x <= 128 or x % 2 for x in dims):
        print(f"compile_check: --dims takes even head widths from 2 to 128, got {args.dims!r}", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision(args.precision)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    limit = SHARED_LIMIT.get(args.arch)
    wanted = [part for part in args.kernels.split(",") if part]
    launches = record_launches(args.quick, dims=dims, dtypes=dtypes, arch=args.arch)
    by_size = size_dependent_variants(launches, args.arch)
    if by_size:  # variants this tool would not compile: its report would not cover what a GPU runs
        print("compile_check: these kernels compile other variants for other sizes (make their size arguments "
              f"unspecialised, see mirrorla.ops._launch.sizes_jit): {'; '.join(by_size)}", file=sys.stderr)
        return 1
    configs = {key: value for key, value in distinct_configurations(launches, args.arch).items()
               if not wanted or any(part in key[0] for part in wanted)}
    if not configs:
        print(f"compile_check: no kernel matches --kernels {args.kernels!r}", file=sys.stderr)
        return 2
    lines = [f"# Triton kernels compiled for sm_{args.arch} (no GPU), Triton {__import__('triton').__version__}, "
             f"fp32 matmul precision {args.precision!r}",
             "", f"shared-memory limit per block: {limit if limit else 'unknown'} bytes", "",
             "| kernel | dtype | constants | warps | shared B | registers | programs per SM | spill stores B "
             "| loop instr | loop LDL/STL | ptxas advisories | uninitialised UR reads | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failures = advised = 0
    for (name, _, warps, stages), (kernel, signature, constexprs, attrs) in sorted(configs.items(),
                                                                                  key=lambda kv: kv[0][:1]):
        dtype = _dtype_label(signature)
        constants = {kernel.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        shown = ",".join(f"{k}={v}" for k, v in sorted(constants.items())
                         if k in ("D", "MAP", "PAIRING", "SWAP", "ANGLES", "BN", "MOMENT", "ONE_PROGRAM", "HAS_BIAS"))
        start = time.perf_counter()
        try:
            info = compile_one(kernel, signature, constexprs, attrs, warps, stages, args.arch)
        except Exception as error:  # report every failing configuration, not only the first
            failures += 1
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            lines.append(f"| {name} | {dtype} | {shown} | {warps} | FAILED: {first} | | | | | | | | |")
            print(lines[-1], flush=True)
            continue
        over = limit is not None and info["shared"] > limit
        uninitialised = info["uninitialised"]
        failures += over or bool(uninitialised)
        # a miscompile: the first offending instruction, as compute-sanitizer would name its address
        reads = (f"{len(uninitialised)} MISCOMPILED: {uninitialised[0][1]} at {uninitialised[0][0]} "
                 f"({uninitialised[0][2]})" if uninitialised else "–" if uninitialised is not None else "")
        advisories = info["advisories"]
        advised += bool(advisories)
        resident = programs_per_sm(info["registers"], warps, info["shared"], args.arch)
        lines.append(f"| {name} | {dtype} | {shown} | {warps} | {info['shared']}{' OVER LIMIT' if over else ''} | "
                     f"{info['registers']} | {'' if resident is None else resident} | {info['spill_stores']} | "
                     f"{_shown(info['loop'])} | "
                     f"{_shown(info['loop_local'])} | {', '.join(advisories) if advisories else '–'} | {reads} | "
                     f"{time.perf_counter() - start:.1f} |")
        print(lines[-1], flush=True)
    # ptxas's performance advisories (wgmma serialised) are reported, not failures: the kernels still compute
    lines += ["", f"{len(configs)} configurations, {failures} failed, {advised} with ptxas performance advisories"]
    print(lines[-1])
    if args.out:  # written whole or not at all
        from mirrorla.tools.checkpoint import atomic_write_text

        atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
