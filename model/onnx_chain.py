"""Several denoising steps as one ONNX graph: the runner's U-Net graph copied K times, each copy followed by the
update, so that ONNX Runtime runs K steps in one call with no Python between the forwards.

Why: at batch 1 on CPU every step's torch calls around the U-Net (coefficients, the update, noise, bookkeeping)
cost about a millisecond on a shared VM, a fifth of a step, because their code has gone cold while the forward ran.
Measured in bench/results/chain-in-graph-cpu.md (bench/chain_in_graph.py), the 1000-step chain at batch 1: 1.32x
(best; 1.31x median) with 10 steps per call over one call per step, the same pixels; 5 steps per call 1.27x, and
past 10 the medians no longer move (20: 5.46 s, 50: 5.44, vs 5.49) while admissions and cancels would wait longer.
ONNX's own `Loop` operator over the same step gained little or lost (1.05x; 0.87x and 0.94x in earlier runs): its
per-iteration machinery costs about what the Python it saves does, hence copies, not a loop. The copies are made
from the graph as ONNX Runtime has optimized it (model/runner_onnx.py), so they share one set of reordered conv
filters; copies of the exported graph got a set each (+23 MB of memory for ten copies of cpu32, vs +14) and
ran their forwards 4-14% slower (two scratch runs), which took most of the gain (the run kept at the end of
the results file).

The step is the engine's update for samplers that need no earlier x0 estimate and no known pixels (model/engine.py):
    x <- a x + b out + c z
with (t, a, b, c) the step's row of the coefficient table (model/diffusion.py) and z its noise, both fed in.
Inputs: x (B, C, H, W), coef (K, B, 4) = (t, a, b, c) per step and row, z (K, B, C, H, W); output x_out, the x after
K steps. B is the symbolic dimension "batch", which a session pins (the runner runs one row per call). The U-Net's
weights are shared by the copies.
"""

from __future__ import annotations

import numpy as np


def step_nodes(unet, index: str, x_in: str, x_out: str, tag: str = "") -> list:
    """One step as ONNX nodes: row `index` (the name of an int64 scalar) of the graph inputs coef and z, the U-Net
    (`unet`, an onnx.ModelProto with inputs x, t and output eps) on `x_in`, and `x_out = a x_in + b eps + c z`.
    `tag` is appended to every name the step makes (so that copies do not collide)."""
    from onnx import NodeProto, helper, numpy_helper

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    nodes = [helper.make_node("Gather", ["coef", index], ["coef_i"], axis=0),  # (B, 4)
             helper.make_node("Split", ["coef_i"], ["t_col", "a_col", "b_col", "c_col"], axis=1, num_outputs=4),
             const("axis1", np.array([1], np.int64)), const("axes23", np.array([2, 3], np.int64)),
             helper.make_node("Squeeze", ["t_col", "axis1"], ["t"]),  # the U-Net's inputs are x and t
             *[helper.make_node("Unsqueeze", [f"{k}_col", "axes23"], [k]) for k in "abc"],  # (B, 1, 1, 1)
             helper.make_node("Identity", [x_in], ["x"]),
             *unet.graph.node,  # -> eps (eps or v: the table folds in the conversion)
             helper.make_node("Gather", ["z", index], ["z_i"], axis=0),
             helper.make_node("Mul", ["a", x_in], ["ax"]), helper.make_node("Mul", ["b", "eps"], ["b_out"]),
             helper.make_node("Mul", ["c", "z_i"], ["cz"]), helper.make_node("Add", ["ax", "b_out"], ["sum1"]),
             helper.make_node("Add", ["sum1", "cz"], [x_out])]
    if not tag:
        return nodes
    shared = {i.name for i in unet.graph.initializer} | {"coef", "z", index, x_in, x_out, ""}
    renamed = []
    for i, node in enumerate(nodes):
        copy = NodeProto()
        copy.CopyFrom(node)
        for names in (copy.input, copy.output):
            names[:] = [n if n in shared else n + tag for n in names]
        copy.name = f"{node.name or i}{tag}"
        renamed.append(copy)
    return renamed


def image_input(name: str, shape: tuple[int, int, int], leading: tuple = ()):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [*leading, "batch", *shape])


def unrolled_chain(unet, steps: int, shape: tuple[int, int, int]):
    """The graph of `steps` copies of the step (see the module docstring) as an onnx.ModelProto."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, indices = [], []
    for k in range(steps):
        indices.append(numpy_helper.from_array(np.array(k, np.int64), f"step{k}"))
        nodes += step_nodes(unet, f"step{k}", f"state{k}" if k else "x_in", f"state{k + 1}", tag=f"@{k}")
    nodes.append(helper.make_node("Identity", [f"state{steps}"], ["x_out"]))
    graph = helper.make_graph(
        nodes, f"chain{steps}",
        [image_input("x_in", shape), helper.make_tensor_value_info("coef", TensorProto.FLOAT, [steps, "batch", 4]),
         image_input("z", shape, (steps,))],
        [image_input("x_out", shape)], initializer=[*unet.graph.initializer, *indices])
    model = helper.make_model(graph, opset_imports=unet.opset_import)
    model.ir_version = unet.ir_version
    return model
