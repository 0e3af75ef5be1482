#!/usr/bin/env python3
"""Generate the committed test fixtures under tests/fixtures/ from the real producers.

Run by hand (CI never runs it) with the venv python that has torch 2.9.1:

    /work/venvs/t29/bin/python scripts/make_fixtures.py [--only NAME ...] [--out tests/fixtures]
                                                        [--venvs /work/venvs] [--facts facts.json]

NAME is a fixture or a group (default: all):
    dcp/fsdp_w1 fsdp_w2 fsdp_w3 fsdp_w4 fsdp_w8   group "fsdp"
    dcp/hf_w2 zstd_w2 per_rank_meta_w2 demo_w4
    dcp/torch24_w2 torch27_w2 torch215_w2         group "versions"
    torchsave  pickle  safetensors  convert  variants  axolotl  zero  inputs  lora
                                                  (inputs: scripts/fixtures/inputs.py, torch 2.14 in
                                                   /work/venvs/ax: reserved names, fp8/fp4, torchtitan)
                                                  ("convert" runs scripts/fixtures/convert.py's
                                                   generate(out / "convert") when that file exists)
    group "dcp" = every dcp/ fixture
A fixture's directory is deleted and rewritten, so reruns overwrite cleanly. Values are fixed: numpy
PCG64 seeded by each tensor's name (torch.Generator(1234) / manual_seed(0) for torchsave's views and
the transformers model). DCP files still differ between runs in their uuids (save_id, serialization_id).

Who produced what (the versions are also recorded in each expected.json / *.json):
    /work/venvs/t29  torch 2.9.1 (+cu128 wheel used on CPU), safetensors 0.8.0, transformers 4.57.6,
                     numpy 2.4.x, zstandard (pip-installed for the zstd fixture), Python 3.11.7:
                     everything except the three below
    /work/venvs/t24  torch 2.4.1, numpy<2, safetensors: dcp/torch24_w2
    /work/venvs/t27  torch 2.7.1, numpy, safetensors:   dcp/torch27_w2
    /work/venvs/t215 torch 2.15.0, numpy, safetensors:  dcp/torch215_w2
    /work/venvs/ax   torch 2.14, transformers 5.x, peft 0.21 (pip install axolotl==0.21.0): lora
                     (scripts/fixtures/lora.py; needs tests/fixtures/axolotl/base for its tokenizer)
Those three venvs were made with `python3 -m venv /work/venvs/tXX && /work/venvs/tXX/bin/pip install
torch==X numpy safetensors`; a missing one is skipped and reported.

Tensors in each fixture: the spec_* functions of scripts/fixtures/dcp_save.py (DCP),
scripts/fixtures/torchsave.py, scripts/fixtures/pickles.py, scripts/fixtures/safetensors_models.py;
tests/fixtures/README.md lists them in tables. In short:
    dcp/fsdp_wN     {"model": sd} from N gloo ranks; sd = DTensors on a 1-D CPU mesh (Shard(0) uneven
                    13x8 f32 with NaN/+-Inf/-0.0, Shard(1) 8x12 f32, Shard(0) bf16 7x5, Shard(0) f16
                    9x4, Shard(1) f64 4x9, Replicate() 3x3), plain tensors (f16/f32 norms, 0-d f32,
                    empty (0,4), a transposed 4x6 view), int64/int32/int8/uint8/bool sharded and plain,
                    for N in {4, 8} two 2-D mesh tensors ((R, S0) f32 10x6 and (S0, S1) bf16 10x9),
                    and two non-tensors (int 7, str); names carry _orig_mod/_fsdp_wrapped_module/
                    _checkpoint_wrapped_module segments
    dcp/hf_w2       flat sd (no "model" nesting) through HuggingFaceStorageWriter(save_distributed=True)
    dcp/zstd_w2     fsdp_w2 content, FileSystemWriter(_extensions=[ZStandard()])
    dcp/per_rank_meta_w2  fsdp_w2 content, dcp.save(..., use_collectives=False)
    dcp/torchXX_w2  fsdp_w2 content saved by torch XX
    dcp/demo_w4     tiny Llama (vocab 256, hidden 64, inter 172, 2 layers), bf16, Shard(0), 4 ranks,
                    {"model": sd} as Accelerate saves; plus config.json
"""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from fixtures import common  # noqa: E402

# name -> (venv or None for the running python, dcp_save.py arguments)
DCP_JOBS = {
    "fsdp_w1": (None, ["--kind", "fsdp", "--world", "1"]),
    "fsdp_w2": (None, ["--kind", "fsdp", "--world", "2"]),
    "fsdp_w3": (None, ["--kind", "fsdp", "--world", "3"]),
    "fsdp_w4": (None, ["--kind", "fsdp", "--world", "4"]),
    "fsdp_w8": (None, ["--kind", "fsdp", "--world", "8"]),
    "hf_w2": (None, ["--kind", "hf", "--world", "2"]),
    "zstd_w2": (None, ["--kind", "fsdp", "--world", "2", "--zstd"]),
    "per_rank_meta_w2": (None, ["--kind", "fsdp", "--world", "2", "--no-collectives"]),
    "torch24_w2": ("t24", ["--kind", "fsdp", "--world", "2"]),
    "torch27_w2": ("t27", ["--kind", "fsdp", "--world", "2"]),
    "torch215_w2": ("t215", ["--kind", "fsdp", "--world", "2"]),
    "demo_w4": (None, ["--kind", "demo", "--world", "4"]),
}
OTHER_JOBS = ["torchsave", "pickle", "safetensors", "convert", "variants", "axolotl", "zero", "inputs", "lora"]
GROUPS = {
    "fsdp": [k for k in DCP_JOBS if k.startswith("fsdp_")],
    "versions": ["torch24_w2", "torch27_w2", "torch215_w2"],
    "dcp": list(DCP_JOBS),
}

LOG = []


def log(msg):
    print(msg, flush=True)
    LOG.append(msg)


def expand(names):
    out = []
    for n in names:
        n = n.removeprefix("dcp/")
        if n in GROUPS:
            out += GROUPS[n]
        elif n in DCP_JOBS or n in OTHER_JOBS:
            out.append(n)
        else:
            sys.exit(f"unknown fixture {n!r}; known: {', '.join(list(DCP_JOBS) + OTHER_JOBS + list(GROUPS))}")
    return list(dict.fromkeys(out))


def run_dcp(name, out_root, venvs, facts):
    venv, args = DCP_JOBS[name]
    python = sys.executable if venv is None else str(venvs / venv / "bin" / "python")
    if not Path(python).exists():
        return f"skipped: {python} missing (create it: python3 -m venv {venvs / venv} && pip install torch ...)"
    fdir = common.fresh_dir(out_root / "dcp" / name)
    t0 = time.time()
    proc = subprocess.run(
        [python, str(SCRIPTS / "fixtures" / "dcp_save.py"), *args],
        cwd=fdir, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        noise = re.compile(r"\[Gloo\]|Warning|warnings.warn|storage\(\)")
        err = "\n".join(line for line in proc.stderr.splitlines() if not noise.search(line))
        raise RuntimeError(f"dcp/{name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{err[-6000:]}")
    fact_lines = [line[6:] for line in proc.stdout.splitlines() if line.startswith("FACTS ")]
    f = json.loads(fact_lines[-1])
    facts[name] = f
    if name == "demo_w4":
        demo_extras(fdir)
    summarize(name, f, time.time() - t0)
    return "ok"


def summarize(name, f, secs):
    files = ", ".join(f"{k} {v}" for k, v in f["files"].items())
    log(f"dcp/{name}: torch {f['torch']}, {secs:.0f}s; files: {files}")
    if "layout" in f and "headers" not in f:
        # Which files hold tensors saved once (replicated) and the non-tensor items.
        single = {k: v[0]["file"] for k, v in f["layout"].items() if isinstance(v, list) and len(v) == 1}
        by_file = {}
        for k, v in single.items():
            by_file.setdefault(v, []).append(k.rsplit(".", 1)[-1] if "." in k else k)
        byt = {k: v["bytes_item"] for k, v in f["layout"].items() if isinstance(v, dict)}
        log(f"    single-chunk tensors by file: {json.dumps({k: len(v) for k, v in by_file.items()})}; "
            f"bytes items: {json.dumps(byt)}")
        empties = [(k, c["offsets"], c["sizes"]) for k, v in f["layout"].items() if isinstance(v, list)
                   for c in v if 0 in c["sizes"]]
        if empties:
            log(f"    empty chunks recorded: {empties}")
        tds = {str(c["transform"]) for v in f["layout"].values() if isinstance(v, list) for c in v}
        log(f"    metadata files {f['metadata_files']}, version {f.get('version')}, fields "
            f"{f.get('metadata_fields')}, transform_descriptors seen {sorted(tds)}")
    if "headers" in f:
        for fn, h in f["headers"].items():
            log(f"    {fn}: header {h['header_len']} B, metadata {json.dumps(h['metadata'])}")
        log(f"    torch's own consolidate_safetensors_files on these shards: {f['torch_consolidation']}")


def demo_extras(fdir):
    """config.json for the demo model, and a check that the reference loads into LlamaForCausalLM."""
    import torch
    import transformers
    from safetensors.torch import load_file

    sys.path.insert(0, str(SCRIPTS / "fixtures"))
    import dcp_save

    config = transformers.LlamaConfig(**dcp_save.DEMO_CONFIG, torch_dtype="bfloat16")
    config.to_json_file(fdir / "config.json")
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    ref = load_file(fdir / "reference.safetensors")
    missing, unexpected = model.load_state_dict(ref, strict=True)
    assert not missing and not unexpected
    log(f"dcp/demo_w4: reference.safetensors loads into LlamaForCausalLM strictly ({len(ref)} tensors)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="fixtures or groups to make (default: all)")
    ap.add_argument("--out", type=Path, default=SCRIPTS.parent / "tests" / "fixtures")
    ap.add_argument("--venvs", type=Path, default=Path("/work/venvs"), help="where t24/t27/t215 live")
    ap.add_argument("--facts", type=Path, help="write everything observed in the DCP files here (json)")
    args = ap.parse_args()

    jobs = expand(args.only) if args.only else list(DCP_JOBS) + OTHER_JOBS
    out_root = args.out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    convert_py = SCRIPTS / "fixtures" / "convert.py"

    facts, status = {}, {}
    for job in jobs:
        t0 = time.time()
        try:
            if job in DCP_JOBS:
                status[job] = run_dcp(job, out_root, args.venvs, facts)
            elif job == "convert":
                if not convert_py.exists():
                    status[job] = "skipped: scripts/fixtures/convert.py does not exist"
                    continue
                spec = importlib.util.spec_from_file_location("fixtures.convert", convert_py)
                mod = importlib.util.module_from_spec(spec)
                sys.modules["fixtures.convert"] = mod
                spec.loader.exec_module(mod)
                mod.generate(out_root / "convert")
                status[job] = "ok"
            else:
                module = {
                    "torchsave": "torchsave",
                    "pickle": "pickles",
                    "safetensors": "safetensors_models",
                    "variants": "variants",
                    "axolotl": "axolotl",
                    "zero": "zero",
                    "inputs": "inputs",
                    "lora": "lora",
                }[job]
                mod = __import__(f"fixtures.{module}", fromlist=["make"])
                mod.make(out_root, log)
                status[job] = "ok"
        except Exception as exc:  # report every failure, keep going with the other fixtures
            status[job] = f"FAILED: {exc}"
            log(f"{job}: FAILED\n{exc}")
        status[job] += f" ({time.time() - t0:.0f}s)"

    if args.facts:
        args.facts.write_text(json.dumps(facts, indent=1, default=str) + "\n")

    print("\n==== summary ====")
    for job, st in status.items():
        print(f"  {job:18} {st}")
    print(f"  {out_root} total: {common.du(out_root) / 1e6:.2f} MB ({common.du(out_root)} bytes)")
    for sub in sorted(p for p in out_root.iterdir() if p.is_dir()):
        print(f"    {sub.name:12} {common.du(sub) / 1e3:8.1f} kB")
    sys.exit(1 if any(s.startswith("FAILED") for s in status.values()) else 0)


if __name__ == "__main__":
    main()
