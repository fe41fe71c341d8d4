"""Targeted checks of the emitted source (not golden snapshots): the seeds' fusion rules and layout."""

import ast
import re
from pathlib import Path

import black
import pytest

from fusegen import compile_spec, ops

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.fuse"))
EXTRA = """\
model Extra(c=12)
input(2, c, 9, 7)
forward:
    bn0: bn(c) -> relu -> pw: conv1x1(c, 20) -> bn1: bn(20) -> relu6
    bn2: bn(20) -> relu
    dw: dwconv3x3(20) -> bn3: bn(20) -> relu6 -> pw2: conv1x1(20, 80) -> bn4: bn(80)
    pool: avgpool(3) -> relu
    global_avgpool -> flatten
    fc: linear(80, 5) -> relu
"""


def sources():
    out = {spec.name: compile_spec(spec.read_text(), f"specs/{spec.name}") for spec in SPECS}
    out["extra.fuse"] = compile_spec(EXTRA, "specs/extra.fuse")
    return out


SOURCES = sources()


def jit_functions(source: str) -> list[ast.FunctionDef]:
    tree = ast.parse(source)
    return [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "triton.jit" for d in node.decorator_list)
    ]


def kernels(source: str) -> list[ast.FunctionDef]:
    """The launched kernels, not the jit helpers they call (fp32_dot)."""
    return [f for f in jit_functions(source) if f.name.endswith("_kernel")]


def calls(node: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func) == name]


def assignments(node: ast.AST, target: str) -> int:
    return sum(
        1
        for n in ast.walk(node)
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == target for t in n.targets)
    )


def fused_kernels(source: str) -> list[ast.FunctionDef]:
    """The kernels of chains (not helpers such as BatchNorm's batch statistics): they write `out_ptr`."""
    return [k for k in kernels(source) if "out_ptr" in {a.arg for a in k.args.args}]


def stored_pointer(store: ast.Call) -> str:
    return re.match(r"\w+", ast.unparse(store.args[0])).group(0)


@pytest.mark.parametrize("spec", SOURCES)
def test_one_store_per_output_tensor_with_the_shared_mask(spec):
    for kernel in kernels(SOURCES[spec]):
        pointers = [stored_pointer(store) for store in calls(kernel, "tl.store")]
        assert len(pointers) == len(set(pointers)), (kernel.name, pointers)
    for kernel in fused_kernels(SOURCES[spec]):
        stores = {stored_pointer(store): store for store in calls(kernel, "tl.store")}
        # the output once, and in training mode the output tile's statistics for the next BatchNorm; a
        # kernel that a pool ends stores either its window's mean or, where programs share the window,
        # its slice's sum (one of the two, by the constexpr SPLIT_WINDOW); so does a global pool that is
        # its kernel's anchor, of its tile, over this program's slice of the pixels
        pooled = ast.unparse(stores["out_ptr"].args[1]).startswith("pooled")
        sliced = ast.unparse(stores["out_ptr"].args[1]) == "acc / (H * W)"
        if sliced:
            assert "range(split * WINDOW_SLICE, tl.minimum((split + 1) * WINDOW_SLICE, H * W), BLOCK_P)" in (
                ast.unparse(kernel)
            ), kernel.name
            assert ast.unparse(stores["partial_ptr"].args[1]) == "acc", kernel.name
        expected = {"out_ptr", "partial_ptr"} if pooled or sliced else {"out_ptr"}
        assert set(stores) in (expected, {"out_ptr", "tile_sum_ptr", "tile_m2_ptr"}), kernel.name
        mask = {kw.arg: ast.unparse(kw.value) for kw in stores["out_ptr"].keywords}["mask"]
        if pooled:
            # one pooled pixel a program; its tiles of the window are summed under the shared mask
            assert mask == "mask_n", kernel.name
            assert {kw.arg: ast.unparse(kw.value) for kw in stores["partial_ptr"].keywords}["mask"] == "mask_n"
            assert "tl.sum(tl.where(mask, acc, 0.0), axis=0)" in ast.unparse(kernel), kernel.name
        else:
            assert mask == "mask", kernel.name


@pytest.mark.parametrize("spec", SOURCES)
def test_one_offsets_and_mask_tuple_shared_by_every_fused_op(spec):
    for kernel in fused_kernels(SOURCES[spec]):
        for name in ("offs_m", "offs_n", "mask_m", "mask_n", "mask"):
            assert assignments(kernel, name) == 1, (kernel.name, name)
        # Per-channel parameters of epilogue ops load at the tile's channel offsets, broadcast explicitly.
        body = ast.unparse(kernel)
        for load in re.findall(r"tl\.load\((\w+_(?:weight|bias|mean|var|scale|shift)_ptr) \+ (\w+), mask=(\w+)", body):
            ptr, offsets, mask = load
            assert (offsets, mask) in {("offs_n", "mask_n"), ("offs_k", "mask_k"), ("ci", "mask_k")}, (
                kernel.name,
                load,
            )
        assert "[None, :]" in body


@pytest.mark.parametrize("spec", SOURCES)
def test_no_dead_parameters(spec):
    tree = ast.parse(SOURCES[spec])
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        body = "\n".join(ast.unparse(s) for s in fn.body)
        for arg in fn.args.args:
            assert re.search(rf"\b{arg.arg}\b", body), f"{fn.name}: parameter {arg.arg} is never used"


@pytest.mark.parametrize("spec", SOURCES)
def test_file_layout_matches_the_seeds_format(spec):
    tree = ast.parse(SOURCES[spec])
    kinds = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            kinds.append("import")
        elif isinstance(node, ast.FunctionDef):
            kinds.append("kernel" if node.decorator_list else "wrapper")
        elif isinstance(node, ast.ClassDef):
            kinds.append(f"class {node.name}")
        else:
            kinds.append(type(node).__name__)
    order = list(dict.fromkeys(kinds))
    assert order == ["import", "kernel", "wrapper", "class ModelNew"]
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Import)]
    assert imports == ["import torch", "import torch.nn as nn", "import triton", "import triton.language as tl"]
    for banned in ("__main__", "get_inputs", "get_init_inputs"):
        assert banned not in SOURCES[spec]


@pytest.mark.parametrize("spec", SOURCES)
def test_forward_calls_only_wrappers_and_views(spec):
    tree = ast.parse(SOURCES[spec])
    wrappers = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.decorator_list}
    model = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    methods = {n.name: n for n in model.body if isinstance(n, ast.FunctionDef)}
    run_methods = {"self.run_training_kernels", "self.run_first_kernel", "self.run_kernels_after_first"}
    # run_first_kernel and run_kernels_after_first where the first launch reads the input in any layout
    assert ("run_first_kernel" in methods) == ("run_kernels_after_first" in methods)
    for method in {"run_kernels", *(m.removeprefix("self.") for m in run_methods)} & methods.keys():
        # a 4-d output is returned in torch's layout: stored so by its launches, or where a loop writes it
        # (the kernels write channels-last), one copy at the end
        returned = [
            n.value for n in ast.walk(methods[method]) if isinstance(n, ast.Return) and isinstance(n.value, ast.Call)
        ]
        layout = {ast.unparse(r.func) for r in returned if ast.unparse(r.func).endswith(".contiguous")}
        # where several kernels read the input channels-last, one copy first serves them all
        body = [s for s in methods[method].body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        body = [s for s in body if ast.unparse(s) != "x = x.contiguous(memory_format=torch.channels_last)"]
        for call in (n for s in body for n in ast.walk(s) if isinstance(n, ast.Call)):
            func = ast.unparse(call.func)
            assert (
                func
                in wrappers - {"replay_cuda_graph", "launch_forward", "run_launch_plan"}
                | {"x.flatten"}
                | run_methods
                | layout
            ), func
    forward_calls = {ast.unparse(n.func) for n in ast.walk(methods["forward"]) if isinstance(n, ast.Call)}
    assert forward_calls <= {
        "RuntimeError",
        "ValueError",
        "isinstance",  # whether triton compiled the kernels, for a CPU tensor
        "len",  # the input check where a loop over a module's children may run no times
        "x.dim",
        "tuple",
        "torch.is_grad_enabled",
        "torch.cuda.device",
        "any",
        "model_parameters",  # the parameters, cached, for TorchBackward
        "ModelNew.TorchBackward.apply",
        "launch_forward",
    }


def chain_ops(text: str) -> list[str]:
    """The op names of a chain line as the kernel names them: `out = out -> conv2: conv3x3(c, c) -> bn2:
    bn(c)` gives conv3x3, bn (the value it binds and the value it starts from are not ops). An op whose
    kernel name follows its arguments (`conv(96, 256, 5, padding=2)` is conv5x5_bias) is read from the
    call with the spec's literal arguments."""
    text = re.sub(r"^(return\s+|\w+\s*=\s*)", "", text)
    depth = 0
    for i, char in enumerate(text):  # a repeat, `* N`, after the chain at parenthesis depth 0
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "*" and depth == 0:
            text = text[:i]
            break
    steps = [
        step.split(":", 1)[-1].strip() if re.match(r"^\s*\w+\s*:", step) else step.strip() for step in text.split("->")
    ]
    names = [specialized_name(step) for step in steps]
    bare = steps[0].split("(")[0].strip()
    return names[1:] if steps and "(" not in steps[0] and ops.lookup(bare) is None else names


def same_op(a: str, b: str) -> bool:
    """Whether two of chain_ops' patterns can name the same op: `(maxpool|maxpool3x3_s2_p1)` and
    `(maxpool|maxpool3x3_s1_p1)` share `maxpool`."""
    return bool(set(a.strip("()").split("|")) & set(b.strip("()").split("|")))


def launched_in(source: str, *methods: str) -> set[str]:
    """The wrappers that ModelNew's methods of these names call."""
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ModelNew"]
    bodies = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name in methods]
    return {ast.unparse(n.func) for f in bodies for n in ast.walk(f) if isinstance(n, ast.Call)}


def specialized_name(call: str) -> str:
    """The kernel name of a written op, as a regular expression: `conv(3, 96, 11, stride=4, padding=2)` ->
    conv11x11_bias; where its arguments are not literals, any name of its family (`(dw)?conv...`)."""
    name = call.split("(")[0].strip()
    op = ops.lookup(name)
    if op is None or op.specialize is None:
        return re.escape(name)
    tree = ast.parse(call.replace(f"{name}(", "f(", 1) if "(" in call else "f()", mode="eval").body
    try:
        values = dict(zip(op.args, (ast.literal_eval(a) for a in tree.args)))
        values.update({kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords})
    except ValueError:
        return rf"(dw)?{name}[0-9a-z_]*?"
    # with a module (labelled, or in a sequence) or without (a functional maxpool names its window)
    names = {op.specialize({**op.defaults, **values}, has_module).name for has_module in (True, False)}
    return "(" + "|".join(map(re.escape, sorted(names))) + ")"


@pytest.mark.parametrize("spec", SOURCES)
def test_kernel_names_say_what_they_fuse_and_point_to_the_spec(spec):
    source = SOURCES[spec]
    lines = source.splitlines()
    for kernel in fused_kernels(source):
        index = next(i for i, line in enumerate(lines) if line.startswith(f"def {kernel.name}("))
        comments = []
        i = index - 2  # skip the decorator
        while lines[i].startswith("#"):
            comments.insert(0, lines[i])
            i -= 1
        # "# bn -> relu -> dwconv3x3 (training mode: ...): one kernel, one store."
        fused = comments[0].removeprefix("# ").split(":")[0].split(" (")[0].split(" -> ")
        pointers = [m for m in (re.match(r"# (\w+\.fuse):(\d+): (.*)", c) for c in comments) if m]
        assert pointers, (kernel.name, comments)
        chains = [chain_ops(p.group(3)) for p in pointers]
        written = [op for chain in chains for op in chain]
        if kernel.name.removesuffix("_kernel") not in launched_in(
            source, "run_kernels", "run_kernels_after_first", "run_first_kernel"
        ):
            # training mode: the name lists its ops (BatchNorm moved to the next anchor), each from a chain it cites
            assert all(f == "copy" or any(re.fullmatch(w, f) for w in written) for f in fused), (
                kernel.name,
                fused,
                written,
            )
            suffix = "_stats" * ("tile_sum_ptr" in ast.unparse(kernel.args)) + "_train" * (
                "bn_scale_ptr" in ast.unparse(kernel.args)
            )
            assert kernel.name.endswith(suffix + "_kernel"), kernel.name
        elif fused == ["copy"]:
            # a copy into a concatenation's slice, where no kernel that makes the part can store there: no chain
            # states it, so it cites the one it serves
            assert kernel.name == "load_kernel", kernel.name
        else:
            # eval mode: named by all the ops of the chains it cites, in order; blocks may repeat a chain, and a
            # chain of elementwise ops may join the epilogue of the kernel before it (`bn2: bn(20) -> relu`)
            # (chains of one kernel may differ in arguments that its module holds: maxpool(3, 2, 1), maxpool(3, 1, 1))
            distinct = []
            for chain in chains:
                if not any(len(c) == len(chain) and all(map(same_op, c, chain)) for c in distinct):
                    distinct.append(chain)
            names = [op for chain in distinct for op in chain]
            assert re.fullmatch("_".join(names) + "_kernel", kernel.name), (kernel.name, chains)
            steps = [w for w in names if w != "flatten"]
            assert len(fused) == len(steps) and all(re.fullmatch(w, f) for w, f in zip(steps, fused)), (
                kernel.name,
                fused,
            )
        if spec != "extra.fuse":
            spec_lines = (ROOT / "specs" / spec).read_text().splitlines()
            for p in pointers:
                assert spec_lines[int(p.group(2)) - 1].split("#")[0].strip() == p.group(3)


@pytest.mark.parametrize("spec", SOURCES)
def test_black_formatted_and_deterministic(spec):
    source = SOURCES[spec]
    assert black.format_str(source, mode=black.Mode()) == source
    text = EXTRA if spec == "extra.fuse" else (ROOT / "specs" / spec).read_text()
    assert compile_spec(text, f"specs/{spec}") == source


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_committed_generated_file_matches_its_spec(spec):
    committed = (ROOT / "generated" / f"{spec.stem}.py").read_text()
    assert committed == SOURCES[spec.name], "generated/ is stale: run `fusegen build`"


def test_blocks_share_kernels():
    source = SOURCES["mobilenet_v1.fuse"]
    names = [k.name for k in kernels(source)]
    assert names == [
        # the stem: its K of 27 never splits, so no K loop in slices comes first
        "conv3x3_bn_relu_kernel",
        # conv_dw_fused (the first two blocks), then conv_dw's two kernels (the other eleven)
        "dwconv3x3_bn_relu_conv1x1_bn_relu_kernel",
        "dwconv3x3_bn_relu_kernel",
        "conv1x1_bn_relu_kernel",
        # conv_dw_pool: the last block's 1x1 conv with the pool at the end of its kernel
        "conv1x1_bn_relu_avgpool_kernel",
        # the classifier: partial sums over slices of K (a launch whose tiles alone would leave most SMs
        # idle), then their sum with the bias
        "linear_slices_kernel",
        "linear_kernel",
        # training mode: each BatchNorm normalises in the next kernel's prologue (the pool's too: it gets a
        # launch of its own)
        "conv3x3_stats_kernel",
        "bn_relu_dwconv3x3_stats_train_kernel",
        "bn_relu_conv1x1_stats_train_kernel",
        "bn_relu_avgpool_train_kernel",
        # and the classifier with its dot in STATS_DOT_PRECISION
        "linear_train_slices_kernel",
        "linear_train_kernel",
        # the helpers that wrappers call: BatchNorm's batch statistics (long columns of tiles in chunks
        # first), and the sum of a pooling window's slices
        "batch_norm_chunk_stats_kernel",
        "batch_norm_batch_stats_kernel",
        "window_slices_sum_kernel",
    ]


@pytest.mark.parametrize("spec", SOURCES)
def test_dependent_launches_wait_before_their_first_load_or_store(spec):
    """A kernel launched with programmatic dependent launch may start while the launch before it runs: its
    first lines wait for that launch's writes, before any load or store, and only then let the next launch
    start. Its wrapper launches it so exactly when the kernel waits: one LAUNCH_PDL, from the launch's grid,
    for both. So do the helpers that wrappers call (BatchNorm's batch statistics, a window's slices)."""
    tree = ast.parse(SOURCES[spec])
    chains = kernels(SOURCES[spec])
    for kernel in chains:
        assert "LAUNCH_PDL" in {a.arg for a in kernel.args.args}
        assert ast.unparse(kernel.body[0]) == (
            "if LAUNCH_PDL:\n    tl.extra.cuda.gdc_wait()\n    tl.extra.cuda.gdc_launch_dependents()"
        )
    launched = []
    for wrapper in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        # the wrapper's statements, and those of its `if` blocks (a helper's first kernel, a window's sum)
        blocks = [node.body for node in ast.walk(wrapper) if isinstance(node, (ast.FunctionDef, ast.If))]
        for before, statement in [pair for block in blocks for pair in zip(block, block[1:])]:
            call = statement.value if isinstance(statement, ast.Expr) else None
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Subscript)):
                continue
            options = {k.arg: ast.unparse(k.value) for k in call.keywords}
            launched.append(ast.unparse(call.func.value))
            # the device of the wrapper's first argument (x; a helper's partial sums or tile statistics)
            device = "tile_sum" if wrapper.name == "batch_norm_batch_stats" else wrapper.args.args[0].arg
            assert ast.unparse(before) == f"LAUNCH_PDL = launch_pdl({device}, {ast.unparse(call.func.slice)})"
            assert options["LAUNCH_PDL"] == options["launch_pdl"] == "LAUNCH_PDL"
    assert sorted(launched) == sorted(k.name for k in chains)


def test_a_global_pool_anchor_shares_its_windows_only_where_nothing_follows_it():
    """Training mode's `bn -> relu -> global_avgpool` (EfficientNetB2's squeeze-excitation pools, on a stored
    conv output): program axis 1 slices each image's pixels, and the wrapper adds the slices' sums where it
    made more than one. With an op after the pool in its kernel, which the slices' sum would have to apply,
    the kernel sums whole windows."""
    source = SOURCES["efficientnet_b2.fuse"]
    by_name = {k.name: k for k in kernels(source)}
    kernel = by_name["bn_relu_global_avgpool_train_kernel"]
    assert {"partial_ptr", "WINDOW_SLICE", "SPLIT_WINDOW"} <= {a.arg for a in kernel.args.args}
    assert "split = tl.program_id(1)" in ast.unparse(kernel)
    wrapper = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "bn_relu_global_avgpool_train")
    text = ast.unparse(wrapper)
    assert "WINDOW_SLICE = window_slice(" in text and "window_slices_sum(partial, out, H * W)" in text
    followed = compile_spec(
        "model P(c=4)\ninput(2, c, 5, 5)\nforward:\n    norm: bn(c) -> relu -> global_avgpool -> sigmoid\n",
        "specs/p.fuse",
    )
    names = [k.name for k in kernels(followed)]
    assert "bn_relu_global_avgpool_sigmoid_train_kernel" in names
    assert "WINDOW_SLICE" not in followed and "window_slices_sum" not in followed


def test_a_dense_loops_kxk_conv_gets_a_slices_kernel_as_its_input_widens():
    """Split K is planned at the spec's example input, where a dense loop's body reads its first layer's
    channels: the dense block's 3x3 conv reads 32 channels there (K = 288, one slice) and 192 in its last
    layer (K = 1,728), so its kernels get slices kernels in both modes."""
    names = [k.name for k in kernels(SOURCES["densenet121_dense_block.fuse"])]
    assert "bn_relu_conv3x3_dropout_slices_kernel" in names
    assert "bn_relu_conv3x3_dropout_train_slices_kernel" in names


def test_split_k_stores_each_slice_once_and_adds_the_slices_in_order():
    """`linear -> relu`: the slices kernel runs the K loop over its program's slice and stores the partial
    sums once; the second kernel, where K has more than one slice (SPLIT_K), adds them in slice order (an
    unrolled loop: every call adds them the same way), else runs the whole K loop itself; then the bias
    and relu, and it stores the output once."""
    by_name = {k.name: k for k in kernels(SOURCES["extra.fuse"])}
    slices, total = by_name["linear_relu_slices_kernel"], by_name["linear_relu_kernel"]
    (k_loop,) = [n for n in ast.walk(slices) if isinstance(n, ast.For) and ast.unparse(n.target) == "k0"]
    assert ast.unparse(k_loop.iter) == "range(split * K_SLICE, (split + 1) * K_SLICE, BLOCK_K)"
    assert [stored_pointer(s) for s in calls(slices, "tl.store")] == ["partial_ptr"]
    assert "fc_bias_ptr" not in {a.arg for a in slices.args.args}

    (branch,) = [n for n in total.body if isinstance(n, ast.If) and ast.unparse(n.test) == "SPLIT_K == 1"]
    one_slice = ast.Module(body=branch.body, type_ignores=[])
    (whole_k,) = [n for n in ast.walk(one_slice) if isinstance(n, ast.For)]
    assert ast.unparse(whole_k.iter) == "range(0, C_in, BLOCK_K)" and "x_ptr" in ast.unparse(whole_k)
    assert ast.unparse(one_slice).index("fp32_dot") < ast.unparse(one_slice).index("fc_bias_ptr")
    (sum_loop,) = [n for n in branch.orelse if isinstance(n, ast.For)]
    assert ast.unparse(sum_loop.iter) == "tl.static_range(SPLIT_K)"
    (load,) = calls(sum_loop, "tl.load")
    assert stored_pointer(load) == "partial_ptr" and "mask=mask" in ast.unparse(load)
    after_sum = branch.orelse[branch.orelse.index(sum_loop) + 1 :]
    assert "fc_bias_ptr" in ast.unparse(ast.Module(body=after_sum, type_ignores=[]))
    after = ast.unparse(ast.Module(body=total.body[total.body.index(branch) + 1 :], type_ignores=[]))
    assert after.index("tl.maximum") < after.index("tl.store(out_ptr")
    assert [stored_pointer(s) for s in calls(total, "tl.store")] == ["out_ptr"]


def test_a_producer_runs_inside_the_k_loop_and_is_never_stored():
    """`dwconv3x3 -> bn -> relu6 -> conv1x1 -> bn`: the depthwise tile is computed in the 1x1 conv's K
    loop, from the kernel's input, and goes straight into tl.dot."""
    (kernel,) = [k for k in kernels(SOURCES["extra.fuse"]) if k.name == "dwconv3x3_bn_relu6_conv1x1_bn_kernel"]
    (k_loop,) = [n for n in kernel.body if isinstance(n, ast.For) and ast.unparse(n.target) == "k0"]
    loop = ast.unparse(k_loop)
    assert "x_ptr" in loop and "fp32_dot(a, b" in loop
    assert assignments(k_loop, "a") >= 3  # zeros, the taps' sum, the producer's bn and relu6 rewrite it
    assert [stored_pointer(s) for s in calls(kernel, "tl.store")] == ["out_ptr"]
    # the producer's constexprs carry its slot; the anchor's own are bare
    params = {a.arg for a in kernel.args.args}
    assert {"CONV_KH", "CONV_STRIDE", "CONV_PAD", "DOT_PRECISION"} <= params and "STRIDE" not in params
    # its tap loads are pipelined through shared memory only as deep as producer_tile says (Triton's
    # default asked a 5x5 producer for 438 KB)
    (wrapper,) = [
        f for f in ast.parse(SOURCES["extra.fuse"]).body if getattr(f, "name", "") == kernel.name[: -len("_kernel")]
    ]
    (launch,) = [
        c for c in ast.walk(wrapper) if isinstance(c, ast.Call) and ast.unparse(c.func).startswith(kernel.name)
    ]
    options = {kw.arg: ast.unparse(kw.value) for kw in launch.keywords}
    assert options["num_stages"] == "num_stages" and options["num_warps"] == "num_warps"
    rule = "BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = producer_tile(C_in, C_out, conv.kernel_size[0] * conv.kernel_size[1], x.dtype)"
    assert rule in ast.unparse(wrapper)


def test_a_tap_producer_runs_at_each_tap_and_is_never_stored():
    """`conv1x1 -> bn -> relu6 -> dwconv3x3 -> bn -> relu6` (EfficientNetB1's expansions): at each tap the
    depthwise conv computes the 1x1 conv from the kernel's input at the tap's pixels, its bn and relu6,
    and zero where the tap is padding; the expanded tensor is never stored."""
    source = SOURCES["efficientnet_b1.fuse"]
    (kernel,) = [k for k in kernels(source) if k.name == "conv1x1_bn_relu6_dwconv3x3_bn_relu6_kernel"]
    (rows,) = [n for n in kernel.body if isinstance(n, ast.For) and ast.unparse(n.target) == "kh"]
    (k_loop,) = [n for n in ast.walk(rows) if isinstance(n, ast.For) and ast.unparse(n.target) == "k0"]
    assert "x_ptr" in ast.unparse(k_loop) and "fp32_dot(a, b, x_tap, CONV_DOT_PRECISION)" in ast.unparse(k_loop)
    taps = ast.unparse(rows)
    assert taps.index("x_tap = tl.minimum(tl.maximum(x_tap, 0.0), 6.0)") < taps.index(
        "x_tap = tl.where(inside, x_tap, 0.0)"
    )
    assert taps.index("x_tap = tl.where(inside, x_tap, 0.0)") < taps.index("acc += x_tap * w[None, :]")
    assert [stored_pointer(s) for s in calls(kernel, "tl.store")] == ["out_ptr"]
    # the producer's constexprs carry its slot; the anchor's own are bare
    params = {a.arg for a in kernel.args.args}
    assert {"KH", "STRIDE", "PAD", "CONV_DOT_PRECISION"} <= params and "DOT_PRECISION" not in params
    wrapper = ast.unparse(wrapper_of(source, kernel.name))
    assert "BLOCK_M, BLOCK_N, BLOCK_K, num_warps = tap_producer_tile(C_in)" in wrapper
    assert "dot_weight(conv, CONV_DOT_PRECISION)" in wrapper and "C_out = conv2.out_channels" in wrapper


def test_a_depthwise_conv_launches_with_its_tile_rule_and_loops_over_kernel_rows():
    """A standalone depthwise conv takes its blocks and warps from dwconv_tile, for the dtype it reads;
    its kernel rows are a loop, not unrolled (unrolled, all the taps' loads were hoisted together)."""
    source = SOURCES["mobilenet_v1.fuse"]
    (kernel,) = [k for k in kernels(source) if k.name == "dwconv3x3_bn_relu_kernel"]
    rows = [n for n in ast.walk(kernel) if isinstance(n, ast.For) and ast.unparse(n.target) == "kh"]
    assert [ast.unparse(n.iter) for n in rows] == ["range(KH)"]
    wrapper = ast.unparse(wrapper_of(source, kernel.name))
    assert "BLOCK_M, BLOCK_N, num_warps = dwconv_tile(C_in, x.dtype)" in wrapper and "num_warps=num_warps" in wrapper


def wrapper_of(source: str, kernel_name: str) -> ast.FunctionDef:
    (wrapper,) = [f for f in ast.parse(source).body if getattr(f, "name", "") == kernel_name[: -len("_kernel")]]
    return wrapper


@pytest.mark.parametrize("spec", ["mobilenet_v1.fuse", "efficientnet_b1.fuse"])
def test_the_stem_reads_the_nchw_input_without_a_copy(spec):
    """The first conv reads the model's input through its four strides, so neither its wrapper nor a
    CUDA graph's copy of the input changes the layout; its tile rule sets the launch's warps and
    stages."""
    source = SOURCES[spec]
    stem = [k for k in kernels(source) if not k.name.endswith("_slices_kernel")][0]
    (loads,) = [ast.unparse(c.args[0]) for c in calls(stem, "tl.load") if "x_ptr" in ast.unparse(c.args[0])]
    assert all(f"x_stride_{d}" in loads for d in "nchw") and "C_in" not in loads
    wrapper = ast.unparse(wrapper_of(source, stem.name))
    assert "contiguous" not in wrapper
    assert (
        "BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = conv_tile(N * OH * OW, KH * KW * C_in, C_out, DOT_PRECISION)"
        in wrapper
    )
    assert "num_warps=num_warps" in wrapper and "num_stages=num_stages" in wrapper
    assert "input_layout = torch.preserve_format" in source


def test_a_graph_copies_the_input_channels_last_for_a_first_kernel_that_needs_it():
    """A net that starts with a BatchNorm reads a channels-last input: its wrapper and the CUDA graph's
    input copy make one."""
    source = SOURCES["extra.fuse"]
    first = kernels(source)[0]
    assert "x = x.contiguous(memory_format=torch.channels_last)" in ast.unparse(wrapper_of(source, first.name))
    assert "input_layout = torch.channels_last" in source


def run_kernels_calls(source: str) -> list[str]:
    """The launches in ModelNew.run_kernels (eval mode), as source."""
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ModelNew"]
    (method,) = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "run_kernels"]
    return [ast.unparse(n.value) for n in method.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)]


@pytest.mark.parametrize("narrow", [False, True], ids=["float32", "float16"])
def test_activations_between_kernels_in_the_declared_dtype(narrow):
    """With `activations(float16)`, every launch whose output another kernel reads passes the model's
    activation_dtype, except the one that feeds the classifier; the last returns float32. Every load of
    the input activation widens it to float32. Without the declaration there is no trace of it."""
    spec = EXTRA.replace(
        "input(2, c, 9, 7)\n", "input(2, c, 9, 7)\nactivations(float16)\n" if narrow else "input(2, c, 9, 7)\n"
    )
    source = compile_spec(spec, "specs/extra.fuse")
    launches = run_kernels_calls(source)
    passes = ["self.activation_dtype" in launch for launch in launches]
    # bn0 -> pw with bn2's line in its epilogue, dw -> pw2, pool, global_avgpool -> flatten (feeds fc), fc
    assert passes == ([True, True, True, False, False] if narrow else [False] * 5)
    assert ("self.activation_dtype = torch.float16" in source) == narrow
    assert ("out_dtype=torch.float32" in source) == narrow
    for kernel in kernels(source):
        for load in calls(kernel, "tl.load"):
            if ast.unparse(load.args[0]).startswith("x_ptr"):
                assert f"{ast.unparse(load)}.to(tl.float32)" in ast.unparse(kernel), kernel.name


def test_a_grouped_conv_is_one_kernel_whose_programs_stay_in_one_group():
    """ShuffleNet's grouped 1x1 convs: one launch for all groups; a program's channel block is inside one
    group, whose input channels its K loop reads, and the grid counts each group's blocks."""
    source = SOURCES["shufflenet_unit.fuse"]
    (kernel,) = [k for k in kernels(source) if k.name == "conv1x1_grouped_bn_relu_kernel"]
    text = ast.unparse(kernel)
    assert "offs_n = group * (C_out // GROUPS) + offs_group_n" in text
    assert "mask_n = offs_group_n < C_out // GROUPS" in text
    (k_loop,) = [n for n in kernel.body if isinstance(n, ast.For) and ast.unparse(n.target) == "k0"]
    assert ast.unparse(k_loop.iter) == "range(0, C_in // GROUPS, BLOCK_K)"
    assert "offs_k = group * (C_in // GROUPS) + offs_group_k" in ast.unparse(k_loop)
    assert "max(1, GROUPS) * cdiv(C_out // GROUPS, BLOCK_N)" in ast.unparse(wrapper_of(source, kernel.name))


def test_a_channel_shuffle_has_no_kernel_of_its_own():
    """Eval mode: the depthwise conv's one store writes each channel at its shuffled place. Training mode:
    bn2 waits for its batch statistics and the grouped conv after the shuffle loads the shuffled channels in
    its K loop. Neither mode launches a kernel for the shuffle alone."""
    source = SOURCES["shufflenet_unit.fuse"]
    names = {k.name for k in kernels(source)}
    assert not any(name.startswith("channel_shuffle") for name in names)
    (dw,) = [k for k in kernels(source) if k.name == "dwconv3x3_bn_channel_shuffle_kernel"]
    (store,) = calls(dw, "tl.store")
    assert "shuffle_n[None, :]" in ast.unparse(store)
    (train,) = [k for k in kernels(source) if k.name == "bn_channel_shuffle_conv1x1_grouped_stats_train_kernel"]
    (k_loop,) = [n for n in train.body if isinstance(n, ast.For) and ast.unparse(n.target) == "k0"]
    shuffled = "(offs_k % SHUFFLE_GROUPS * (C_in // SHUFFLE_GROUPS) + offs_k // SHUFFLE_GROUPS)"
    (load,) = [c for c in calls(k_loop, "tl.load") if "x_ptr" in ast.unparse(c.args[0])]
    assert shuffled in ast.unparse(load)
    assert "dwconv3x3_bn_channel_shuffle" in launched_in(source, "run_kernels")


def test_training_mode_batch_norm_normalises_both_sweeps_of_a_softmax():
    """U-Net's `conv -> bn` then `softmax(-1)` in training mode: bn waits on batch statistics and joins the
    softmax's prologue, applied where each sweep loads a tile (the row's chunks, then the tile's own values)."""
    source = SOURCES["unet_softmax.fuse"]
    (kernel,) = [k for k in kernels(source) if k.name == "bn_softmax_width_train_kernel"]
    (chunks,) = [n for n in kernel.body if isinstance(n, ast.For) and ast.unparse(n.target) == "w0"]
    assert "a = (a - bn_mean[None, :]) * bn_scale[None, :] + bn_bias[None, :]" in ast.unparse(chunks)
    after = "\n".join(ast.unparse(n) for n in kernel.body[kernel.body.index(chunks) + 1 :])
    normalised = after.index("acc = (acc - bn_mean[None, :]) * bn_scale[None, :] + bn_bias[None, :]")
    assert normalised < after.index("acc = tl.exp(acc - row_max[None, :]) / row_sum[None, :]")
    wrapper = ast.unparse(wrapper_of(source, kernel.name))
    assert "BLOCK_M, BLOCK_N, BLOCK_K, num_warps = softmax_tile('width', W, C_in)" in wrapper


def test_a_transposed_conv_computes_the_taps_of_its_rows_classes_only():
    """U-Net's 2x2 stride-2 up-convolutions: the rows are parity-major, each program loops over the output
    classes its rows hold and, for each, over (KH / STRIDE) * (KW / STRIDE) * C_in products (one tap here),
    and stores every row at its pixel with the one store, into the concatenation's slice."""
    source = SOURCES["unet_softmax.fuse"]
    (kernel,) = [k for k in kernels(source) if k.name == "conv_transpose2x2_bias_kernel"]
    (classes,) = [n for n in kernel.body if isinstance(n, ast.For) and ast.unparse(n.target) == "c"]
    assert ast.unparse(classes.iter) == "range(first_class, last_class + 1)"
    (k_loop,) = [n for n in ast.walk(classes) if isinstance(n, ast.For) and ast.unparse(n.target) == "k0"]
    assert ast.unparse(k_loop.iter) == "range(0, TH * TW * C_in, BLOCK_K)"
    assert "TH: tl.constexpr = (KH + STRIDE - 1) // STRIDE" in ast.unparse(kernel)
    assert assignments(kernel, "offs_m") == 1 and "mask_m = rows_in_order < N * OH * OW" in ast.unparse(kernel)
    (store,) = calls(kernel, "tl.store")
    assert "offs_m[:, None] * out_row_stride" in ast.unparse(store)


def test_training_mode_splits_the_weights_of_kxk_convs_and_not_of_1x1_convs():
    """Where BatchNorm uses batch statistics, training mode's 3x3 convs take their weight's low part and run
    "tf32x3_split" (the weight split once on the host); its 1x1 convs keep Triton's "tf32x3" and take no
    low part; eval mode's convs keep the runtime's choice."""
    source = SOURCES["resnet_basic_block.fuse"]
    wrappers = {f.name: ast.unparse(f) for f in ast.parse(source).body if isinstance(f, ast.FunctionDef)}
    for name, precision in (
        ("conv3x3_stats", "tf32x3_split"),
        ("bn_relu_conv3x3_stats_train", "tf32x3_split"),
        ("conv1x1_stats", "tf32x3"),
    ):
        assert f"DOT_PRECISION = '{precision}' if x.is_cuda else 'ieee'" in wrappers[name], name
        assert ("dot_weight_low(conv, DOT_PRECISION)" in wrappers[name]) == (precision == "tf32x3_split"), name
    kernel = ast.unparse(next(k for k in kernels(source) if k.name == "bn_relu_conv3x3_stats_train_kernel"))
    assert "tf32x3_split_dot(a, b, b_low, acc)" in kernel and "conv_weight_low_ptr +" in kernel
    assert "DOT_PRECISION = dot_precision(x, conv)" in wrappers["conv3x3_bn_relu"]


def model_methods(source: str, *names: str) -> list[str]:
    """ModelNew's methods of these names that it has, as source."""
    (cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ModelNew"]
    return [ast.unparse(f) for f in cls.body if isinstance(f, ast.FunctionDef) and f.name in names]


@pytest.mark.parametrize(
    "spec, nchw",
    [
        ("resnet_basic_block.fuse", True),  # one launch stores the output
        ("efficientnet_mbconv.fuse", True),  # a launch in each body of a branch
        ("squeezenet_fire_module.fuse", True),  # a concatenation's parts, into one buffer
        ("densenet121_dense_block.fuse", False),  # a loop's launches, which read the buffer channels-last
    ],
)
def test_the_launches_that_store_the_model_output_store_it_in_torchs_layout(spec, nchw):
    """Where no loop writes it, the model's 4-d output is stored NCHW by the launches that make it, through
    its strides (Kernel.writes_model_output), and ModelNew returns it without a copy; a dense loop's buffer
    is copied out of channels-last at the end, as before."""
    source = SOURCES[spec]
    for run in model_methods(source, "run_kernels", "run_training_kernels"):
        assert run.endswith("return x.contiguous()") != nchw
        asks = "out_layout=torch.contiguous_format" in run or "'layout': torch.contiguous_format" in run
        assert asks == nchw
    writers = [k for k in kernels(source) if "ROWS_IN_ONE_IMAGE" in [a.arg for a in k.args.args]]
    assert bool(writers) == nchw
    for kernel in writers:
        (store,) = [ast.unparse(s.args[0]) for s in calls(kernel, "tl.store") if stored_pointer(s) == "out_ptr"]
        assert store == "out_ptr + out_rows[:, None] + offs_n[None, :] * out_stride_c", kernel.name
