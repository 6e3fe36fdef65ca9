"""An experiment for issue 21: the U-Net's GroupNorm+SiLU as one ONNX Runtime custom operator
(bench/csrc/group_norm_silu.cc), to measure what a fused kernel buys the batch-1 CPU forward. Used by
bench/runner_profile.py with `--ort-include DIR`; not used by the service.

The operator is C++ against ONNX Runtime's C/C++ API headers, which the onnxruntime wheel does not ship. Debian's
libonnxruntime-dev package has them (trixie: ORT 1.21, whose API any later runtime serves):

    curl -sO http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
    dpkg-deb -x libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb /tmp/ort
    python bench/runner_profile.py --ort-include /tmp/ort/usr/include/onnxruntime

- build(include_dir, out_dir): compile the operator with the system's C++ compiler (-O3 -ffast-math -march=native:
  this machine only), returning the shared library's path.
- fuse(model): rewrite an exported U-Net graph in place: each GroupNorm as torch.onnx exports it (Reshape,
  InstanceNormalization, Reshape, Mul, Add), and the SiLU after it where there is one (Sigmoid, Mul), becomes one
  celeba_ddpm.GroupNormSiLU node. Returns how many were fused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

SOURCE = Path(__file__).resolve().parent / "csrc" / "group_norm_silu.cc"
DOMAIN, OP = "celeba_ddpm", "GroupNormSiLU"


def build(include_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    include = Path(include_dir)
    if not (include / "onnxruntime_cxx_api.h").exists():
        raise FileNotFoundError(f"{include}: no onnxruntime_cxx_api.h there (see bench/fused_group_norm.py)")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise FileNotFoundError("no C++ compiler (set CXX)")
    out = Path(out_dir) / "libgroup_norm_silu.so"
    subprocess.run([cxx, "-O3", "-march=native", "-ffast-math", "-std=c++17", "-fPIC", "-shared", f"-I{include}",
                    str(SOURCE), "-o", str(out)], check=True)
    return out


def fuse(model: onnx.ModelProto) -> int:
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def only_user(name: str, op_type: str):
        (n,) = users[name]
        if n.op_type != op_type:
            raise ValueError(f"not a GroupNorm as exported: {n.op_type} after {name}, expected {op_type}")
        return n

    fused, dead = 0, []
    for norm in [n for n in g.node if n.op_type == "InstanceNormalization"]:
        before = producer[norm.input[0]]
        after = only_user(norm.output[0], "Reshape")
        mul = only_user(after.output[0], "Mul")
        add = only_user(mul.output[0], "Add")
        if before.op_type != "Reshape":
            raise ValueError(f"not a GroupNorm as exported: {before.op_type} before {norm.name}")
        gamma = consts[next(i for i in mul.input if i != after.output[0])].reshape(-1).astype(np.float32)
        beta = consts[next(i for i in add.input if i != mul.output[0])].reshape(-1).astype(np.float32)
        out, silu, nodes = add.output[0], 0, [before, norm, after, mul, add]
        following = users.get(out, [])
        sig = next((u for u in following if u.op_type == "Sigmoid"), None)
        prod = next((u for u in following if u.op_type == "Mul"), None)
        if len(following) == 2 and sig and prod and set(prod.input) == {out, sig.output[0]}:
            out, silu, nodes = prod.output[0], 1, nodes + [sig, prod]
        name = f"group_norm_silu_{fused}"
        g.initializer.extend([numpy_helper.from_array(gamma, f"{name}_scale"),
                              numpy_helper.from_array(beta, f"{name}_bias")])
        node = helper.make_node(OP, [before.input[0], f"{name}_scale", f"{name}_bias"], [out], name=name,
                                domain=DOMAIN, num_groups=int(consts[norm.input[1]].shape[0]),
                                epsilon=next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5), silu=silu)
        g.node.insert(list(g.node).index(nodes[-1]), node)
        dead += nodes
        fused += 1
    for n in dead:
        g.node.remove(n)
    _drop_unused(g)
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return fused


def _drop_unused(g: onnx.GraphProto) -> None:
    """Nodes and initializers nothing reads any more (the reshapes' shape computations), so ORT need not."""
    outputs = {o.name for o in g.output}
    while True:
        read = {i for n in g.node for i in n.input} | outputs
        unused = [n for n in g.node if not any(o in read for o in n.output)]
        if not unused:
            break
        for n in unused:
            g.node.remove(n)
    read = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in read]:
        g.initializer.remove(init)
