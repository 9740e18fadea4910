"""The op fuzzer: hypothesis draws calls of the seven ops and every call is held to one contract.

A call is drawn with random shapes (zero-size included), dtypes, layouts (contiguous, transposed,
strided, expanded), values (normal, scaled over many orders of magnitude, or with NaN/Inf planted),
inputs requiring grad, and often one defect (a wrong rank, a size that does not match, a wrong dtype, a
bad scalar, a non-tensor argument). It then runs on the CPU kernel, under FakeTensorMode and on meta
tensors, and :func:`check_call` demands:

* the kernel and both fake runs agree: all succeed with the same shapes and dtypes, or all raise the
  same exception type (ValueError for shapes, sizes, devices and values, TypeError for dtypes);
* an error is clear: ValueError/TypeError whose first line names the op (or argument);
* a result is right: against ``deltainf.reference`` in float64, within a tolerance scaled by the same
  op on absolute values (a bound on the terms summed); finite wherever the reference in the kernel's
  dtype is finite; non-finite exactly where the reference is when NaN/Inf was planted; counts exact;
* gradients are right: against autograd through the reference, for every input that requires grad.

``python tests/op_fuzz.py --calls N --seed S --out counts.json`` runs N calls in this process and writes
the outcome counts per op (the long profile runs several of these in child processes, so a crash or a
hang is caught and named by the call written to ``--last``).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import sys
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltainf import ops, reference  # noqa: E402

OPS = ("kron_project", "kron_project_square_sum", "kron_project_score", "jl_project", "kron_ihvp", "sign_vote",
       "combine_flags")
BAD_DTYPES = (torch.int64, torch.bool, torch.float16, torch.bfloat16, torch.int32)
# (argument, dimension) pairs whose size another argument fixes
_PROJECT_SIZES = [("g", 0), ("g", 1), ("g", 2), ("U", 0), ("V", 0), ("a", 0), ("a", 1)]
CONSTRAINED = {
    "kron_project": _PROJECT_SIZES, "kron_project_square_sum": _PROJECT_SIZES,
    "kron_project_score": _PROJECT_SIZES + [("P", 1), ("P", 2), ("U", 1), ("V", 1)],
    "jl_project": [], "combine_flags": [],
    "kron_ihvp": [("Q_S", 0), ("Q_S", 1), ("Q_A", 0), ("Q_A", 1), ("lam", 0), ("lam", 1), ("G", 1), ("G", 2)],
    "sign_vote": [("transformed", 0), ("transformed", 2), ("base", 0), ("base", 1)],
}
# the two sides of each op's products, for values scaled up on one side and down on the other
OPPOSED = {"kron_project": (("a", "V"), ("g", "U")), "kron_project_square_sum": (("a", "V"), ("g", "U")),
           "kron_project_score": (("a", "V"), ("g", "U", "P")), "kron_ihvp": (("G", "Q_A"), ("Q_S",))}
DEFECTS = ("none", "none", "none", "rank", "size", "dtype", "scalar", "not_tensor")


@dataclass
class Call:
    """One drawn call: the op, its tensors (by argument name, in order), its scalar arguments, and what
    was planted (for the checks)."""

    op: str
    tensors: dict
    scalars: dict
    defect: str = "none"
    planted: bool = False  # NaN/Inf planted in a floating input
    scaled: bool = False  # values scaled over many orders of magnitude

    def describe(self) -> str:
        shapes = {k: (tuple(v.shape), str(v.dtype), tuple(v.stride()), v.requires_grad) if isinstance(v, torch.Tensor)
                  else repr(v) for k, v in self.tensors.items()}
        return f"{self.op} defect={self.defect} planted={self.planted} scaled={self.scaled} {shapes} {self.scalars}"


# FakeTensorMode logs every exception an op raises, with its traceback; refusals are expected here
logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)


# --- drawing ---

def _layout_tensor(draw, shape, dtype, gen):
    """A tensor of `shape` with a drawn memory layout (values standard normal, or random bools)."""
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided", "expanded"]))
    shape = tuple(shape)

    def make(s):
        if dtype == torch.bool:
            return torch.rand(s, generator=gen) > 0.5
        if not dtype.is_floating_point:
            return torch.randint(-3, 4, s, generator=gen, dtype=dtype)
        return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return make(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "strided" and len(shape) >= 1:
        return make(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 1:
        return make((1,) + shape[1:]).expand(shape)
    return make(shape)


def _dims(draw, names, high=6):
    return {n: draw(st.integers(0, high)) for n in names}


def _shapes_for(op, d):
    if op in ("kron_project", "kron_project_square_sum", "kron_project_score"):
        shapes = {"a": (d["N"], d["T"], d["d_in"]), "g": (d["N"], d["T"], d["d_out"]),
                  "U": (d["d_out"], d["r_out"]), "V": (d["d_in"], d["r_in"])}
        if op == "kron_project_score":
            shapes["P"] = (d["Q"], d["r_out"], d["r_in"])
        return shapes
    if op == "jl_project":
        return {"x": (d["N"], d["p"])}
    if op == "kron_ihvp":
        return {"G": (d["B"], d["d_out"], d["d_in"]), "Q_S": (d["d_out"], d["d_out"]),
                "Q_A": (d["d_in"], d["d_in"]), "lam": (d["d_out"], d["d_in"])}
    if op == "sign_vote":
        return {"base": (d["P"], d["N"]), "transformed": (d["P"], d["n"], d["N"])}
    return {"flags": (d["P"], d["N"])}


def _valid_scalars(draw, op, d):
    if op == "jl_project":
        return {"k": draw(st.integers(1, 300)), "seed": draw(st.integers(0, 2**63 - 1)),
                "dist": draw(st.sampled_from(["rademacher", "gaussian"])),
                "offset": draw(st.sampled_from([0, 1, 129, 2**33]))}
    if op == "kron_ihvp":
        return {"damping": draw(st.sampled_from([0.0, 1e-8, 0.1, 3.0])), "eigenbasis": draw(st.booleans())}
    if op == "sign_vote":
        return {"threshold": draw(st.sampled_from([0.0, -0.5, 0.5, math.inf, -math.inf])),
                "min_votes": draw(st.integers(0, 8))}
    if op == "combine_flags":
        return {"min_points": draw(st.integers(1, max(1, d["P"])))}
    return {}


def _bad_scalar(draw, op, scalars, d):
    """Replace one scalar by a value the op must refuse; None when the op has no scalar to spoil."""
    choices = {
        "jl_project": [("k", 0), ("k", -3), ("k", max(d["p"], 2**16) + 1), ("k", 2**31), ("offset", -1),
                       ("dist", "uniform")] + ([("offset", 2**63 - d["p"])] if d["p"] else []),
        "kron_ihvp": [("damping", -1e-3), ("damping", math.nan), ("damping", math.inf)],
        "sign_vote": [("threshold", math.nan), ("min_votes", -1)],
        "combine_flags": [("min_points", 0), ("min_points", d["P"] + 1), ("min_points", -5)],
    }.get(op)
    if not choices:
        return None
    name, value = draw(st.sampled_from(choices))
    return {**scalars, name: value}


@st.composite
def calls(draw, op_names=OPS):
    """A strategy of :class:`Call` for the ops in `op_names`."""
    op = draw(st.sampled_from(op_names))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    d = _dims(draw, ("N", "d_in", "d_out", "r_in", "r_out", "Q", "B", "P", "n"))
    d["T"] = draw(st.sampled_from([0, 1, 1, 2, 3, 6]))  # T = 1 and T > 1 take different kernel routes
    d["p"] = draw(st.sampled_from([0, 1, 5, 64, 129, 300]))
    d["N"] = draw(st.sampled_from([0, 1, 3, 7])) if op == "jl_project" else d["N"]
    if op == "combine_flags":
        d["P"] = max(d["P"], 1) if draw(st.booleans()) else d["P"]
    shapes = _shapes_for(op, d)
    dtype = torch.bool if op == "combine_flags" else draw(st.sampled_from([torch.float32, torch.float64]))
    defect = draw(st.sampled_from(DEFECTS))
    bad_name = draw(st.sampled_from(sorted(shapes)))
    if defect == "rank":
        shape = shapes[bad_name]
        shapes[bad_name] = shape[:-1] if shape and draw(st.booleans()) else shape + (2,)
    elif defect == "size" and CONSTRAINED[op]:
        name, i = draw(st.sampled_from(CONSTRAINED[op]))
        shape = list(shapes[name])
        shape[i] += draw(st.sampled_from([1, 2]))
        shapes[name] = tuple(shape)
    elif defect == "size":
        defect = "none"
    if op == "combine_flags" and shapes["flags"][0] == 0 and defect in ("none", "scalar"):
        defect = "size"  # no test points to combine
    tensors = {}
    for name, shape in shapes.items():
        t_dtype = dtype
        if defect == "dtype" and name == bad_name:
            # the other float dtype is a defect only beside a tensor it must match
            other = (torch.float32, torch.float64) if len(shapes) > 1 else ()
            t_dtype = draw(st.sampled_from([b for b in BAD_DTYPES + other if b != dtype]))
        tensors[name] = _layout_tensor(draw, shape, t_dtype, gen)
    scalars = _valid_scalars(draw, op, d)
    if op == "kron_ihvp" and tensors["lam"].dtype.is_floating_point and defect == "none":
        tensors["lam"] = tensors["lam"].abs() + draw(st.sampled_from([0.0, 0.5]))  # Λ >= 0, as fitted
        if scalars["damping"] == 0.0:
            scalars["damping"] = 0.1  # keep lam + damping away from 0: the division is the point, not 1/0
    if defect == "scalar":
        spoiled = _bad_scalar(draw, op, scalars, d)
        scalars, defect = (spoiled, defect) if spoiled is not None else (scalars, "none")
    call = Call(op, tensors, scalars, defect)
    floating = [n for n, t in tensors.items() if t.dtype in (torch.float32, torch.float64)]
    if defect == "not_tensor":
        tensors[bad_name] = draw(st.sampled_from([None, [1.0, 2.0], 3.0]))
        return call
    value_mode = draw(st.sampled_from(["normal", "normal", "scaled", "opposed", "planted"]))
    top = 20 if dtype == torch.float32 else 150
    if value_mode == "scaled" and floating:
        call.scaled = True
        for n in floating:
            tensors[n] = tensors[n] * 10.0 ** draw(st.integers(-top, top))
    elif value_mode == "opposed" and floating:
        # huge factors on one side of a product and tiny ones on the other, so that the result is moderate
        # while intermediates (a V, its square, ...) may not be representable
        call.scaled = True
        e = draw(st.integers(top // 2, top)) * draw(st.sampled_from([-1, 1]))
        up, down = OPPOSED.get(op, (tuple(floating), ()))
        for n in floating:
            sign = 1 if n in up else -1 if n in down else 0
            tensors[n] = tensors[n] * 10.0 ** (sign * e // draw(st.sampled_from([1, 2])))
    elif value_mode == "planted" and floating:
        n = draw(st.sampled_from(floating))
        t = tensors[n].clone()
        if t.numel():
            flat = t.view(-1) if t.is_contiguous() else None
            if flat is not None:
                i = draw(st.integers(0, t.numel() - 1))
                flat[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
                tensors[n] = t
                call.planted = True
    if defect == "none" and not call.planted and not call.scaled and draw(st.integers(0, 3)) == 0:
        for n in floating:
            tensors[n] = tensors[n].detach().requires_grad_(True)
    return call


# --- running ---

def _positional(call: Call) -> tuple:
    return tuple(call.tensors.values())


def _run_raw(call: Call, convert):
    """The op through torch.ops with the tensors mapped by `convert` -> (result, None) or (None, exc)."""
    args = tuple(convert(t) if isinstance(t, torch.Tensor) else t for t in _positional(call))
    return _invoke(getattr(torch.ops.deltainf, call.op).default, args, call)


def _run_wrapper(call: Call):
    return _invoke(getattr(ops, call.op), _positional(call), call)


def _invoke(fn, args, call: Call):
    """fn(tensors..., scalars by name) -> (result, None) or (None, exc); the scalar names are the schema's,
    which the wrappers and the reference share."""
    try:
        return fn(*args, **call.scalars), None
    except Exception as exc:  # noqa: BLE001 - every exception is judged by the contract
        return None, exc


def _reference(call: Call, dtype=None, absolute=False):
    """The reference result on the call's tensors, cast to `dtype` (and made absolute) first."""
    def prep(t):
        t = t.detach()
        if dtype is not None and t.dtype.is_floating_point:
            t = t.to(dtype)
        return t.abs() if absolute and t.dtype.is_floating_point else t

    args = [prep(t) for t in _positional(call)]
    s = call.scalars
    if absolute and call.op == "jl_project":  # |x| @ |Omega|: the bound on the rounding error
        x = args[0]
        omega = reference.jl_matrix(x.shape[1], s["k"], s["seed"], s["dist"], s["offset"], dtype=torch.float64)
        return x @ omega.abs().to(x.dtype)
    # kron_ihvp needs no case of its own: with |lam| and damping >= 0 its bound is the op itself
    return getattr(reference, call.op)(*args, **s)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("meta").requires_grad_(t.requires_grad)


class ContractError(AssertionError):
    pass


def _clear(exc: BaseException, names) -> bool:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return isinstance(exc, (ValueError, TypeError)) and any(n in first for n in names)


def check_call(call: Call) -> str:
    """Run `call` everywhere and enforce the contract; returns the outcome ("ok" or "error: <type>")."""
    if call.defect == "not_tensor":
        _, exc = _run_wrapper(call)
        if exc is None or not isinstance(exc, TypeError) or call.op not in str(exc):
            raise ContractError(f"non-tensor argument: expected a TypeError naming the op, got {exc!r}")
        return "error: TypeError"
    result, exc = _run_raw(call, lambda t: t)
    with FakeTensorMode() as mode:
        fake_result, fake_exc = _run_raw(call, lambda t: mode.from_tensor(t))
    meta_result, meta_exc = _run_raw(call, _meta)
    runs = [("fake", (fake_result, fake_exc))]
    # a meta tensor may stand for a CUDA one, so float16/bfloat16 (CUDA-only dtypes) pass there
    if not (isinstance(exc, TypeError) and "need CUDA" in str(exc)):
        runs.append(("meta", (meta_result, meta_exc)))
    for name, (r, e) in runs:
        if (exc is None) != (e is None) or (exc is not None and type(exc) is not type(e)):
            raise ContractError(f"{name} disagrees with the CPU kernel: kernel {exc!r}, {name} {e!r}")
        if exc is None:
            got, want = _as_tuple(r), _as_tuple(result)
            if [(tuple(x.shape), x.dtype) for x in got] != [(tuple(x.shape), x.dtype) for x in want]:
                raise ContractError(f"{name} result {[(tuple(x.shape), x.dtype) for x in got]} != kernel "
                                    f"{[(tuple(x.shape), x.dtype) for x in want]}")
    if exc is not None:
        if call.defect == "none":
            raise ContractError(f"a valid call was refused: {exc!r}")
        if not _clear(exc, (call.op,)):
            raise ContractError(f"unclear error: {exc!r}")
        return f"error: {type(exc).__name__}"
    if call.defect != "none":
        raise ContractError(f"a call with a {call.defect} defect was accepted")
    _check_values(call, result)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in call.tensors.values()):
        if call.op in ("sign_vote", "combine_flags"):  # counts and flags: never differentiable
            if any(r.requires_grad for r in _as_tuple(result)):
                raise ContractError("an output requires grad without a backward")
        else:
            _check_gradients(call, result)
    return "ok"


def _check_values(call: Call, result) -> None:
    if call.op in ("sign_vote", "combine_flags"):
        for got, want in zip(_as_tuple(result), _as_tuple(_reference(call))):
            if not torch.equal(got, want):
                raise ContractError(f"{call.op} differs from the reference in {(got != want).sum().item()} entries")
        return
    out = result.detach()
    same = _reference(call, dtype=out.dtype)
    if call.planted:
        if not torch.equal(out.isfinite(), same.isfinite()):
            raise ContractError("non-finite entries differ from the reference with NaN/Inf planted")
        return
    truth = _reference(call, dtype=torch.float64)
    bound = _reference(call, dtype=torch.float64, absolute=True)
    finite = same.isfinite()
    if not out[finite].isfinite().all():
        raise ContractError("non-finite result where the reference in the same dtype is finite")
    eps = 1e-4 if out.dtype == torch.float32 else 1e-10
    tiny = 1e-30 if out.dtype == torch.float32 else 1e-290
    check = finite & truth.isfinite() & bound.isfinite()
    err = (out.double() - truth)[check].abs()
    allowed = (eps * bound + tiny)[check]
    if (err > allowed).any():
        worst = (err / allowed).argmax()
        raise ContractError(f"value off by {err[worst].item():.3g}, allowed {allowed[worst].item():.3g}")


def _check_gradients(call: Call, result) -> None:
    inputs = [t for t in call.tensors.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    weight = torch.randn(result.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = torch.autograd.grad((result * weight.to(result.dtype)).sum(), inputs, allow_unused=True)
    twins = [t.detach().double().requires_grad_(True) for t in inputs]
    swap = dict(zip(map(id, inputs), twins))
    twin_call = Call(call.op, {k: swap.get(id(v), v) for k, v in call.tensors.items()}, call.scalars)
    ref_out = _reference_with_grad(twin_call)
    want = torch.autograd.grad((ref_out * weight).sum(), twins, allow_unused=True)
    tol = 1e-3 if result.dtype == torch.float32 else 1e-8
    for g, w, t in zip(got, want, inputs):
        w = torch.zeros_like(t, dtype=torch.float64) if w is None else w
        if g is None:
            if _max_abs(w) > 0:
                raise ContractError("no gradient where the reference has one")
            continue
        scale = max(_max_abs(w), 1e-30)
        if _max_abs(g.double() - w) > tol * scale:
            raise ContractError(f"gradient off by {_max_abs(g.double() - w):.3g} (largest {scale:.3g})")


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _reference_with_grad(call: Call):
    return getattr(reference, call.op)(*_positional(call), **call.scalars)


def main(argv=None) -> int:
    from hypothesis import HealthCheck, given, seed, settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--last", default=None, help="file that holds the call in progress (to name a crash)")
    args = parser.parse_args(argv)
    counts = collections.defaultdict(collections.Counter)
    failures = []

    @settings(max_examples=args.calls, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(call=calls())
    def run(call):
        if args.last:
            with open(args.last, "w") as f:
                f.write(call.describe())
        try:
            outcome = check_call(call)
        except ContractError as err:
            outcome = "violation"
            failures.append(f"{err} :: {call.describe()}")
        counts[call.op][outcome] += 1

    seed(args.seed)(run)()
    with open(args.out, "w") as f:
        json.dump({"counts": {op: dict(c) for op, c in counts.items()}, "violations": failures}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
