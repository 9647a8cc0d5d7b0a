"""nanochat's optimizer: Muon for the block matrices, AdamW for everything else, in one `torch.optim.Optimizer`.

Muon (per group of same-shape matrices, stacked): Nesterov momentum -> MuonEq row equilibration -> Polar Express
orthogonalisation -> Muon+ renormalisation -> NorMuon variance reduction -> cautious weight decay and update with
nanochat's shape-based LR factor `sqrt(max(1, rows / cols))`. Each stage can be switched off; with all of them off
and `orthogonalizer="newton_schulz"` the step is exactly `torch.optim.Muon` (the tests use it as the oracle).

Two paths run the same maths (`adamw_update`, `muon_prepare`, `_iterate`, `muon_finish` below, one definition each):
eager, and compiled as nanochat compiles its fused steps (`torch.compile(dynamic=False, fullgraph=True)`, the
step-varying hyper-parameters passed as 0-D tensors so that a schedule recompiles nothing). `compile_step=None`
picks compiled on CUDA and eager on CPU (see `MuonAdamW._compiles` for the CPU measurements).

Distributed (DDP): gradients arrive averaged, every rank keeps the full optimizer state, and only the expensive
part, the orthogonalisation, is split: rank r orthogonalises its share of each stack and an all-gather shares the
results. So every rank's state_dict is complete, a checkpoint resumes on any world size, and N processes step
exactly like one. FSDP shards the matrices themselves, which Muon cannot orthogonalise piecewise: it is refused.
"""

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

# Polar Express (arXiv 2505.16932; num_iters=5, safety 2e-2, cushion 2), one (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Keller Jordan's quintic Newton-Schulz, as in torch.optim.Muon.
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)

# On CPU the eager path updates a Muon group one matrix at a time (cache-sized temporaries, 2-D matmuls).
CPU_MATRICES_PER_UPDATE = 1

FSDP_ERROR = (
    "Muon orthogonalises whole matrices, but FSDP shards them across ranks. Train with DDP instead "
    "(accelerate_configs/ddp_8gpu.yaml or multi_node.yaml): nanochat's models up to d32 fit one GPU per replica."
)


# name, shape, dtype, device -> a temporary
Buffer = Callable[[str, tuple[int, ...], torch.dtype, torch.device], Tensor]
# A hyper-parameter of the step: a Python number on the eager path, a 0-D tensor on the compiled one.
Scalar = float | Tensor


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def orthogonalization_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype Muon orthogonalises in for a run of this mixed precision (`TrainingArguments.mixed_precision`:
    "no", "bf16" or "fp16", from --bf16 or the accelerate config). nanochat's rule (optim.py, COMPUTE_DTYPE):
    bf16 where training computes in bf16, fp32 otherwise; fp16's range is too narrow for the iteration."""
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; use 'no', 'bf16' or 'fp16'")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def _coefficients(method: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    if method == "polar_express":
        return POLAR_EXPRESS_COEFFS[:steps]
    if method == "newton_schulz":
        return (NEWTON_SCHULZ_COEFFS,) * steps
    raise ValueError(f"unknown orthogonalizer {method!r}; use 'polar_express' or 'newton_schulz'")


def _spectral_bound(frobenius: Tensor, method: str) -> Tensor:
    """What the iteration divides its input by so that every singular value is at most 1 (each method's own)."""
    return frobenius * 1.01 + 1e-6 if method == "polar_express" else frobenius.clamp(min=1e-7)


def orthogonalize(g: Tensor, steps: int, method: str, dtype: torch.dtype) -> Tensor:
    """Approximate U V^T of a (rows, cols) matrix or of each matrix of a (K, rows, cols) stack."""
    x = g.to(dtype, copy=True)
    x.div_(_spectral_bound(x.norm(dim=(-2, -1), keepdim=True), method))
    return _iterate(x, method, steps, _fresh)


# ---------------------------------------------------------------------------------------------------------------
# The maths, one definition for both paths. Eager: Python numbers, and `buffer` is MuonAdamW._buffer (temporaries
# kept from step to step on CPU, written through out=). Compiled: 0-D tensors, and `buffer` is _fresh, whose empty
# tensors and out= writes the compiler turns into its own fused kernels (no temporary survives the graph). The few
# ops that take a number only (addcmul_'s and addcdiv_'s `value`) go through the helpers below; a Python `if` on a
# hyper-parameter is taken only for a number (a tensor's value must not steer the graph, or it would recompile).


def _addcmul_(out: Tensor, a: Tensor, b: Tensor, value: Scalar) -> Tensor:
    """out += value * a * b, in torch's addcmul order."""
    if isinstance(value, Tensor):
        return out.add_(value * a * b)
    return out.addcmul_(a, b, value=value)


def _addcdiv_(out: Tensor, a: Tensor, b: Tensor, value: Scalar) -> Tensor:
    """out += value * a / b, in torch's addcdiv order."""
    if isinstance(value, Tensor):
        return out.add_(value * a / b)
    return out.addcdiv_(a, b, value=value)


def _may_be_nonzero(value: Scalar) -> bool:
    return isinstance(value, Tensor) or value != 0


def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, decay: Scalar,
                 beta1_weight: Scalar, beta2_weight: Scalar, bias2: Scalar, eps: Scalar,
                 neg_step_size: Scalar) -> None:
    """One AdamW step of one parameter (decoupled weight decay), in the state's dtype. The caller folds the step
    count into the scalars: decay = 1 - lr * wd, beta_weight = 1 - beta, bias2 = 1 - beta2^t,
    neg_step_size = -lr / (1 - beta1^t)."""
    work = exp_avg.dtype
    g = grad.to(work)
    master = p if p.dtype == work else p.to(work)
    master.mul_(decay)
    exp_avg.lerp_(g, beta1_weight)
    exp_avg_sq.lerp_(g.square(), beta2_weight)
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    _addcdiv_(master, exp_avg, denom, neg_step_size)
    if p.dtype != work:
        p.copy_(master)


def muon_prepare(grads: Tensor, momentum_buffer: Tensor, momentum: Scalar, momentum_weight: Scalar, *,
                 nesterov: bool, row_equilibration: bool, method: str, ortho_dtype: torch.dtype,
                 buffer: Buffer) -> Tensor:
    """Muon up to the orthogonalisation, for a (K, rows, cols) stack of gradients in the state's dtype: the momentum
    (momentum_weight = 1 - momentum) and MuonEq, then the iteration's input in its dtype, divided by the method's
    bound on the spectral norm. Written for few passes over memory, each into a buffer: on CPU the elementwise
    stages, not the matmuls, are what a step adds over plain Muon."""
    rows = grads.size(-2)
    work, device = momentum_buffer.dtype, momentum_buffer.device
    momentum_buffer.lerp_(grads, momentum_weight)
    g = buffer("g", grads.shape, work, device)
    if nesterov:
        torch.lerp(grads, momentum_buffer, momentum, out=g)
    else:
        g.copy_(momentum_buffer)
    x = buffer("ortho_in", grads.shape, ortho_dtype, device)
    if row_equilibration:
        # MuonEq: every row to the mean row norm, so no row dominates the orthogonalisation. Then every row has
        # that norm, so the Frobenius norm is known without another pass: one multiplication does both.
        # (In place, then a copy: a multiplication that writes another dtype is ~10x slower on CPU.)
        row_norms = g.norm(dim=-1, keepdim=True)
        target = row_norms.square().sum(dim=(-2, -1), keepdim=True).sqrt() / math.sqrt(rows)
        row_factor = target / row_norms.clamp_min(1e-12)
        frobenius = (row_factor * row_norms).square().sum(dim=(-2, -1), keepdim=True).sqrt()
        x.copy_(g.mul_(row_factor / _spectral_bound(frobenius, method)))
    else:
        # torch.optim.Muon's order: the norm of the low-precision copy
        x.copy_(g)
        x.div_(_spectral_bound(x.norm(dim=(-2, -1), keepdim=True), method))
    return x


def _iterate(x: Tensor, method: str, steps: int, buffer: Buffer) -> Tensor:
    """The odd polynomial iteration on a normalised x: X <- aX + (bA + cA^2) X with A = X X^T, the Gram matrix on
    the smaller side (for a tall X, X <- aX + X (bA + cA^2) with A = X^T X: the same products, no transposed copy).

    `buffer(name, shape, dtype, device)` gives the temporaries; x may be one of them (it is written over). A stack
    goes through batched matmuls (one kernel per iteration on GPU); a one-matrix stack through 2-D ones, which CPU
    BLAS runs about 10% faster. The result lives in a buffer: use it before the next call."""
    if x.dim() == 3 and x.size(0) == 1:
        return _iterate(x[0], method, steps, buffer).unsqueeze(0)
    mm, mm_add = (torch.mm, torch.addmm) if x.dim() == 2 else (torch.bmm, torch.baddbmm)
    tall = x.size(-2) > x.size(-1)
    side = x.size(-1) if tall else x.size(-2)
    gram = buffer("gram", (*x.shape[:-2], side, side), x.dtype, x.device)
    poly = buffer("poly", gram.shape, x.dtype, x.device)
    nxt = buffer("iterate", x.shape, x.dtype, x.device)
    if not torch.compiler.is_compiling() and nxt.data_ptr() == x.data_ptr():  # (compiled: fresh, and no pointers)
        nxt = buffer("iterate2", x.shape, x.dtype, x.device)
    for a, b, c in _coefficients(method, steps):
        if tall:
            mm(x.mT, x, out=gram)
            mm_add(gram, gram, gram, beta=b, alpha=c, out=poly)
            mm_add(x, x, poly, beta=a, out=nxt)
        else:
            mm(x, x.mT, out=gram)
            mm_add(gram, gram, gram, beta=b, alpha=c, out=poly)
            mm_add(x, poly, x, beta=a, out=nxt)
        x, nxt = nxt, x
    return x


def muon_finish(masters: Tensor, ortho: Tensor, second: Tensor | None, beta2_weight: Scalar, neg_lr: Scalar,
                neg_lr_wd: Scalar, decay: Scalar, *, renormalize: bool, cautious: bool, buffer: Buffer) -> None:
    """Muon after the orthogonalisation: updates the (K, rows, cols) stack `masters` (the state's dtype) in place
    with the orthogonalised `ortho`. neg_lr = -lr * shape factor, neg_lr_wd = neg_lr * wd (cautious decay),
    decay = 1 - lr * wd (plain decay, torch.optim.Muon's), beta2_weight = 1 - beta2 (NorMuon, when `second`)."""
    rows, cols = masters.shape[-2:]
    work, device = masters.dtype, masters.device
    u = buffer("g", masters.shape, work, device).copy_(ortho)
    # Muon+ (a fixed Frobenius norm sqrt(min(rows, cols)), whatever the iteration left) and NorMuon (a per-row, or
    # per-column, second moment, rescaled so the update keeps its total norm) end in one per-row (or per-column)
    # factor, applied in the update itself.
    target_norm = math.sqrt(min(rows, cols))
    square = buffer("square", masters.shape, work, device)
    if second is not None:
        red_dim = -1 if rows >= cols else -2
        size = u.size(red_dim)
        # a sum of squares: torch's norm along a strided dimension is ~10x slower on CPU
        v_mean = torch.mul(u, u, out=square).sum(dim=red_dim, keepdim=True).div_(size)
        scale = 1.0
        if renormalize:
            scale = target_norm / (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt().clamp_min(1e-12)
            v_mean.mul_(scale.square())
        v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
        second.lerp_(v_mean, beta2_weight)
        step_size = second.clamp_min(1e-10).rsqrt()
        v_norm_new = ((v_mean * size) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        factor = step_size * (scale * v_norm / v_norm_new.clamp_min(1e-10))
    elif renormalize:
        factor = target_norm / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    else:
        factor = torch.ones(masters.size(0), 1, 1, dtype=work, device=device)
    if cautious and _may_be_nonzero(neg_lr_wd):
        # decay only where the update and the weight agree in sign (arXiv 2411.16085); the factor is positive, so
        # the direction's sign is the update's; ge_ in place leaves a 0/1 mask
        agree = torch.mul(u, masters, out=square).ge_(0)
        _addcmul_(masters, masters, agree, neg_lr_wd)
    elif not cautious and _may_be_nonzero(neg_lr_wd):
        masters.mul_(decay)
    _addcmul_(masters, u, factor, neg_lr)


# ---------------------------------------------------------------------------------------------------------------
# The compiled path

_COMPILED: dict[str, Callable] = {}
_SIGNATURES: dict[str, set] = {}


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What dynamo specialises a call on: each tensor's type, shape, strides, dtype, device and requires_grad, and
    the other arguments' values."""
    tensors = tuple((type(a), tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad)
                    if isinstance(a, Tensor) else a for a in args)
    return tensors, tuple(sorted(kwargs.items()))


def _compiled(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) through `torch.compile(fn, dynamic=False, fullgraph=True)`, compiled once per process.

    Static shapes, as nanochat's: every signature (shapes, dtypes, switches) is a specialisation of its own: the 4
    AdamW and 4 Muon shapes of nanochat's models. Dynamo keeps `recompile_limit` (8) of them per function and, with
    fullgraph=True, fails past it; a process that builds optimizers for several models would get there, so the
    limit is raised to the number of signatures this process has used.

    Two options make the graph round as the eager kernels do, so that the iteration's bf16 input comes out bit for
    bit the same on both paths (a bf16 ulp there moves the result ~1e-4 after a few steps): `emulate_precision_casts`
    rounds bf16 intermediates where eager does (the classic configuration's norm of the bf16 copy), and the C++
    code (CPU) contracts a * b + c into one fused multiply-add, as eager's vectorised lerp does (the momentum)."""
    name = fn.__name__
    seen = _SIGNATURES.setdefault(name, set())
    key = _signature(args, kwargs)
    if key not in seen:
        seen.add(key)
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, len(seen))
    compiled = _COMPILED.get(name)
    if compiled is None:
        options = {"emulate_precision_casts": True, "cpp.enable_floating_point_contract_flag": "fast"}
        compiled = _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True, options=options)
    return compiled(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer


def _working_dtype(p: Tensor) -> torch.dtype:
    # Optimizer math runs in fp32 at least (bf16 weights get fp32 state), in fp64 for fp64 weights.
    return torch.promote_types(p.dtype, torch.float32)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_sharded(p: Tensor) -> bool:
    return type(p).__name__ == "DTensor"


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two kinds of groups: `kind="muon"` (2-D, same shape within a group) and `kind="adamw"`.

    Muon group keys: lr, momentum, nesterov, ns_steps, beta2 (NorMuon; None disables), weight_decay.
    AdamW group keys: lr, betas, eps, weight_decay (decoupled).

    `ortho_dtype`: the dtype of the orthogonalisation, nanochat's compute dtype: bf16 where training computes in
    bf16, fp32 otherwise (`orthogonalization_dtype(training_args.mixed_precision)`, as the stages pass it). None
    takes nanochat's own default (common.py, COMPUTE_DTYPE): bf16 on CUDA GPUs that have it (compute capability
    8.0+), and elsewhere the state's working dtype (fp32 for fp32 and bf16 weights).

    `compile_step`: run each group's update through torch.compile (True), eagerly (False), or compiled on CUDA
    and eager elsewhere (None). Both paths keep the same state, so a checkpoint of one resumes in the other.
    """

    def __init__(
        self,
        param_groups: Iterable[dict],
        *,
        orthogonalizer: str = "polar_express",
        row_equilibration: bool = True,
        renormalize: bool = True,
        cautious_weight_decay: bool = True,
        ortho_dtype: torch.dtype | None = None,
        compile_step: bool | None = None,
    ):
        groups = []
        for group in param_groups:
            group = dict(group)
            kind = group.setdefault("kind", "adamw")
            params = list(group["params"])
            if kind == "muon":
                group.setdefault("momentum", 0.95)
                group.setdefault("nesterov", True)
                group.setdefault("ns_steps", 5)
                group.setdefault("beta2", 0.9)
                group.setdefault("weight_decay", 0.0)
                shapes = {tuple(p.shape) for p in params}
                if len(shapes) > 1 or any(p.dim() != 2 for p in params):
                    raise ValueError(f"a Muon group needs 2-D parameters of one shape, got shapes {sorted(shapes)}")
            elif kind == "adamw":
                group.setdefault("betas", (0.8, 0.95))
                group.setdefault("eps", 1e-10)
                group.setdefault("weight_decay", 0.0)
            else:
                raise ValueError(f"unknown group kind {kind!r}; use 'muon' or 'adamw'")
            if any(_is_sharded(p) for p in params):
                raise RuntimeError(FSDP_ERROR)
            group["params"] = params
            group.setdefault("initial_lr", group["lr"])
            groups.append(group)
        super().__init__(groups, defaults={})
        _coefficients(orthogonalizer, 0)  # validates the name
        self.orthogonalizer = orthogonalizer
        self.row_equilibration = row_equilibration
        self.renormalize = renormalize
        self.cautious_weight_decay = cautious_weight_decay
        self.ortho_dtype = ortho_dtype
        self.compile_step = compile_step
        self._scratch: dict[tuple, Tensor] = {}
        self._scalars: dict[tuple, Tensor] = {}

    def _compiles(self, device: torch.device) -> bool:
        """Whether a group on `device` goes through the compiled path. By default CUDA compiles (nanochat's choice)
        and CPU does not, by measurement (benchmarks/train_step.py --only muon, 2 idle cores): on d12 shapes the
        compiled step took 1.38-1.48x the eager one's time (its whole-stack temporaries are fresh memory every step,
        which the eager path's kept buffers avoid); on the CPU tier's d4 shapes it took 0.75x, but that saves 10 ms
        a step against 17-19 s of compilation per process (and it needs a C++ compiler). On a machine whose cores
        other processes share, the compiled step is the faster one (0.3-0.5x): the eager path's thousands of small
        parallel regions each wait for a descheduled thread. `compile_step=True` chooses it."""
        return device.type == "cuda" if self.compile_step is None else self.compile_step

    def _ortho_dtype(self, device: torch.device, work: torch.dtype) -> torch.dtype:
        if self.ortho_dtype is not None:
            return self.ortho_dtype
        bf16_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if bf16_gpu else work

    def _tensors(self, device: torch.device, dtype: torch.dtype, **values: float) -> list[Tensor]:
        """This step's hyper-parameters as 0-D tensors on the parameters' device, filled in place: the compiled
        functions get the same tensors every step, so a schedule that changes their values recompiles nothing."""
        out = []
        for name, value in values.items():
            key = (name, device, dtype)
            t = self._scalars.get(key)
            if t is None:
                t = self._scalars[key] = torch.empty((), dtype=dtype, device=device)
            out.append(t.fill_(value))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(_is_sharded(p) for p in params):
                raise RuntimeError(FSDP_ERROR)
            if group["kind"] == "muon":
                self._muon_step(group, group["params"])
            else:
                self._adamw_step(group, params)
        return loss

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            state = self.state[p]
            work = _working_dtype(p)
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=work)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=work)
            state["step"] += 1
            t = state["step"]
            scalars = dict(decay=1 - lr * wd, beta1_weight=1 - beta1, beta2_weight=1 - beta2, bias2=1 - beta2**t,
                           eps=eps, neg_step_size=-lr / (1 - beta1**t))
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            if self._compiles(p.device):
                _compiled(adamw_update, *tensors, *self._tensors(p.device, work, **scalars))
            else:
                adamw_update(*tensors, *scalars.values())

    def _muon_step(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            if p.grad is None:  # a stack is updated as a whole; a missing grad is a zero grad
                p.grad = torch.zeros_like(p)
        rows, cols = params[0].shape
        work = _working_dtype(params[0])
        state = self.state[params[0]]  # the group's stacked state lives on its first parameter
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=work, device=params[0].device)
            if group["beta2"] is not None:
                shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                state["second_momentum_buffer"] = torch.zeros(shape, dtype=work, device=params[0].device)
        buf, second = state["momentum_buffer"], state.get("second_momentum_buffer")
        compiled = self._compiles(params[0].device)
        # Every stage is per matrix, so a group can be updated a few matrices at a time with identical results. On
        # CPU the eager path does so: that keeps the working set in cache and below glibc's mmap threshold
        # (whole-group temporaries of 100+ MB are fresh pages every step, ~7 GB per d12 step). On GPU, compiled
        # and under DDP the whole stack goes at once (one batched matmul per iteration; one all-gather).
        if compiled or params[0].is_cuda or _distributed():
            self._muon_update(group, params, buf, second, compiled)
            return
        chunk = CPU_MATRICES_PER_UPDATE
        for start in range(0, len(params), chunk):
            part = slice(start, start + chunk)
            self._muon_update(group, params[part], buf[part], None if second is None else second[part], compiled)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A temporary of the eager Muon update. On CPU it is kept from step to step: glibc returns freed blocks of a
        few MB to the kernel, and faulting them in again cost more than the arithmetic done in them. On GPU the
        caching allocator already reuses memory, and a kept buffer would only raise the peak."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name, tuple(shape), dtype)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(shape, dtype=dtype)
        return buf

    def _muon_update(self, group: dict, params: list[Tensor], buf: Tensor, second: Tensor | None,
                     compiled: bool) -> None:
        """One Muon step for a stack of same-shape matrices; `buf` and `second` are the group's state (or views of
        it). The parts around the orthogonalisation are compiled on the compiled path; the orthogonalisation too,
        but under torch.distributed each rank runs it on its share, and the all-gather between stays eager."""
        rows, cols = params[0].shape
        work = buf.dtype
        # read-only: a single matrix's gradient is used in place, never written
        grads = params[0].grad.to(work).unsqueeze(0) if len(params) == 1 else torch.stack(
            [p.grad.to(work) for p in params])
        # the stack the update writes: a single matrix in the working dtype is its own (updated in place); others
        # are stacked and copied back
        in_place = len(params) == 1 and params[0].dtype == work
        masters = params[0].unsqueeze(0) if in_place else torch.stack([p.to(work) for p in params])

        lr, wd, momentum, beta2 = group["lr"], group["weight_decay"], group["momentum"], group["beta2"]
        adjusted_lr = lr * math.sqrt(max(1.0, rows / cols))
        # the hyper-parameters (numbers here, 0-D tensors on the compiled path) and the switches of each part
        before = dict(momentum=momentum, momentum_weight=1 - momentum)
        after = dict(beta2_weight=0.0 if beta2 is None else 1 - beta2, neg_lr=-adjusted_lr,
                     neg_lr_wd=-adjusted_lr * wd, decay=1 - lr * wd)
        method, steps = self.orthogonalizer, group["ns_steps"]
        before_switches = dict(nesterov=group["nesterov"], row_equilibration=self.row_equilibration, method=method,
                               ortho_dtype=self._ortho_dtype(buf.device, work))
        after_switches = dict(renormalize=self.renormalize, cautious=self.cautious_weight_decay)
        if compiled:
            device = buf.device
            x = _compiled(muon_prepare, grads, buf, *self._tensors(device, work, **before), buffer=_fresh,
                          **before_switches)
            u = self._iterate_shared(x, lambda share: _compiled(_iterate, share, method, steps, _fresh))
            _compiled(muon_finish, masters, u, second, *self._tensors(device, work, **after), buffer=_fresh,
                      **after_switches)
        else:
            x = muon_prepare(grads, buf, *before.values(), buffer=self._buffer, **before_switches)
            u = self._iterate_shared(x, lambda share: _iterate(share, method, steps, self._buffer))
            muon_finish(masters, u, second, *after.values(), buffer=self._buffer, **after_switches)
        if not in_place:
            torch._foreach_copy_(params, list(masters.unbind(0)))

    def _iterate_shared(self, x: Tensor, iterate: Callable[[Tensor], Tensor]) -> Tensor:
        """Orthogonalise the normalised stack x with `iterate`; under torch.distributed each rank iterates on a
        contiguous share, then an all-gather shares the results."""
        if not _distributed():
            return iterate(x)
        world, rank = dist.get_world_size(), dist.get_rank()
        chunk = math.ceil(x.size(0) / world)
        padded = torch.zeros((chunk * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.size(0)] = x
        mine = iterate(padded[rank * chunk : (rank + 1) * chunk])
        pieces = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(pieces, mine.contiguous())
        return torch.cat(pieces)[: x.size(0)]


# ---------------------------------------------------------------------------------------------------------------
# nanochat's parameter groups


def nanochat_param_groups(
    model: torch.nn.Module,
    *,
    embedding_lr: float = 0.3,
    unembedding_lr: float = 0.008,
    matrix_lr: float = 0.02,
    scalar_lr: float = 0.5,
    weight_decay: float = 0.28,
    batch_lr_scale: float = 1.0,
) -> list[dict]:
    """nanochat HEAD's `GPT.setup_optimizer` groups for a NanoChatForCausalLM.

    AdamW LRs are scaled by `(d_model / 768) ** -0.5`; every LR but the smear group's by `batch_lr_scale`.
    Muon gets every parameter under `model.layers` (the ve_gate matrices included), one group per shape.
    """
    d = model.config.hidden_size
    dmodel_scale = (d / 768) ** -0.5
    core = model.model
    groups = [
        dict(kind="adamw", params=[model.lm_head.weight], lr=unembedding_lr * dmodel_scale * batch_lr_scale,
             betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01, name="lm_head"),
        dict(kind="adamw", params=[core.embed_tokens.weight], lr=embedding_lr * dmodel_scale * batch_lr_scale,
             betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001, name="wte"),
    ]
    if len(core.value_embeds):
        groups.append(dict(kind="adamw", params=list(core.value_embeds.parameters()),
                           lr=embedding_lr * dmodel_scale * 0.5 * batch_lr_scale, betas=(0.8, 0.995), eps=1e-10,
                           weight_decay=0.01, name="value_embeds"))
    if core.resid_lambdas is not None:
        groups.append(dict(kind="adamw", params=[core.resid_lambdas], lr=scalar_lr * 0.01 * batch_lr_scale,
                           betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05, name="resid_lambdas"))
        groups.append(dict(kind="adamw", params=[core.x0_lambdas], lr=scalar_lr * batch_lr_scale,
                           betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0, name="x0_lambdas"))
    smear = [t for t in (getattr(core.smear_gate, "weight", None), core.smear_lambda, core.backout_lambda)
             if t is not None]
    if smear:
        groups.append(dict(kind="adamw", params=smear, lr=0.2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                           name="smear"))
    matrices = list(core.layers.parameters())
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                           lr=matrix_lr * batch_lr_scale, momentum=0.95, ns_steps=5, beta2=0.9,
                           weight_decay=weight_decay, name=f"muon{shape}"))
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered and p.requires_grad]
    if missing:
        raise ValueError(f"parameters without an optimizer group: {missing}")
    return groups


def nanochat_2025_param_groups(
    model: torch.nn.Module,
    *,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    matrix_lr: float = 0.02,
) -> list[dict]:
    """nanochat ORIG's `GPT.setup_optimizers` groups for a 2025-generation NanoChatForCausalLM.

    AdamW (betas (0.8, 0.95), eps 1e-10, no weight decay) for lm_head and the token embedding, LRs scaled by
    `(d_model / 768) ** -0.5`; Muon for every block matrix at `matrix_lr`, momentum 0.95, Nesterov, 5 steps, no
    NorMuon second moment (beta2 None) and no weight decay. ORIG groups single-GPU Muon parameters by numel and we
    by shape: the update of each matrix is the same. Nothing is scaled by the batch size.
    """
    dmodel_scale = (model.config.hidden_size / 768) ** -0.5
    core = model.model
    groups = [
        dict(kind="adamw", params=[model.lm_head.weight], lr=unembedding_lr * dmodel_scale, betas=(0.8, 0.95),
             eps=1e-10, weight_decay=0.0, name="lm_head"),
        dict(kind="adamw", params=[core.embed_tokens.weight], lr=embedding_lr * dmodel_scale, betas=(0.8, 0.95),
             eps=1e-10, weight_decay=0.0, name="wte"),
    ]
    matrices = list(core.layers.parameters())
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                           momentum=0.95, nesterov=True, ns_steps=5, beta2=None, weight_decay=0.0,
                           name=f"muon{shape}"))
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered and p.requires_grad]
    if missing:  # a 2025 config with a 2026 feature switched on: ORIG's recipe has no LR for its parameters
        raise ValueError(f"nanochat ORIG's optimizer (generation 2025) has no group for {missing}; train a model "
                         "with these features as generation 2026")
    return groups


# MuonAdamW's switches for nanochat ORIG's Muon (nanochat/muon.py): Keller Jordan's Newton-Schulz on the Nesterov
# momentum and nothing else (no MuonEq, Muon+, NorMuon or cautious decay), i.e. torch.optim.Muon.
ORIG_MUON = dict(orthogonalizer="newton_schulz", row_equilibration=False, renormalize=False,
                 cautious_weight_decay=False)


def nanochat_optimizer(model: torch.nn.Module, *, ortho_dtype: torch.dtype | None = None,
                       compile_step: bool | None = None, **group_kwargs) -> MuonAdamW:
    """nanochat's optimizer for the model's architecture generation: ORIG's Muon and groups for a 2025 model
    (:func:`nanochat_2025_param_groups`), HEAD's for a 2026 one (:func:`nanochat_param_groups`, `group_kwargs`).

    A 2025 model takes the same keyword arguments: `scalar_lr` (it has no scalars) and `batch_lr_scale` (ORIG scales
    no LR by the batch) are ignored, and a weight decay other than 0 is refused (ORIG's Muon has none)."""
    if model.config.generation != "2025":
        return MuonAdamW(nanochat_param_groups(model, **group_kwargs), ortho_dtype=ortho_dtype,
                         compile_step=compile_step)
    group_kwargs.pop("scalar_lr", None)
    group_kwargs.pop("batch_lr_scale", None)
    weight_decay = group_kwargs.pop("weight_decay", 0.0)
    if weight_decay != 0:
        raise ValueError(f"weight_decay={weight_decay}: a 2025-generation model trains with nanochat ORIG's Muon, "
                         "which has no weight decay; set --weight_decay 0")
    return MuonAdamW(nanochat_2025_param_groups(model, **group_kwargs), **ORIG_MUON, ortho_dtype=ortho_dtype,
                     compile_step=compile_step)


# ---------------------------------------------------------------------------------------------------------------
# schedules


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05) -> float:
    """Linear warmup, constant, then a linear warmdown over the last `warmdown_ratio` to `final_lr_frac`."""
    warmdown_steps = round(warmdown_ratio * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= total_steps - warmdown_steps:
        return 1.0
    progress = (total_steps - step) / max(warmdown_steps, 1)
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, total_steps: int, warmdown_ratio: float = 0.65) -> float:
    """nanochat's `get_muon_momentum`: 0.85 -> 0.97 over the first 400 steps, then 0.97, and 0.97 -> 0.90 during
    the warmdown. The warmup comes first: in a run shorter than 400 steps it holds throughout, warmdown or not."""
    warmdown_steps = round(warmdown_ratio * total_steps)
    warmdown_start = total_steps - warmdown_steps
    if step < 400:
        frac = step / 400
        return (1 - frac) * 0.85 + frac * 0.97
    if step >= warmdown_start:
        progress = (step - warmdown_start) / max(warmdown_steps, 1)  # no warmdown: only the step past the end
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def warmup_muon_momentum(step: int) -> float:
    """The Muon momentum of nanochat's ORIG base_train and mid_train and of HEAD's chat_sft: 0.85 -> 0.95 linearly
    over the first 300 steps, then held at 0.95 (no 0.97 plateau and no dip during the warmdown)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# how each stage moves Muon's momentum (NanoChatSchedule's `momentum_schedule`); None keeps the group's own
MOMENTUM_SCHEDULES = ("pretrain", "warmup")


# base_train's Muon schedules (NanoChatSchedule's options) per generation: HEAD's momentum climb to 0.97 with its dip
# in the warmdown and its cosine weight decay (2026); ORIG's momentum warmup to 0.95, and no weight decay (2025).
PRETRAIN_SCHEDULES = {
    "2025": dict(momentum_schedule="warmup", weight_decay_schedule=False),
    "2026": dict(momentum_schedule="pretrain", weight_decay_schedule=True),
}


def weight_decay_multiplier(step: int, total_steps: int) -> float:
    """Muon weight decay follows a cosine from its full value to 0 over the run."""
    return 0.5 * (1 + math.cos(math.pi * step / max(total_steps, 1)))


class NanoChatSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets, at every step, each group's LR, and the Muon groups' momentum and weight decay, from the step alone.

    `momentum_schedule`: "pretrain" (HEAD base_train's :func:`muon_momentum`), "warmup" (:func:`warmup_muon_momentum`)
    or None (the momentum the groups were built with, as nanochat's ORIG SFT and RL)."""

    def __init__(self, optimizer: MuonAdamW, total_steps: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                 final_lr_frac: float = 0.05, momentum_schedule: str | None = "pretrain",
                 weight_decay_schedule: bool = True,
                 last_epoch: int = -1):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmdown_ratio = warmdown_ratio
        self.final_lr_frac = final_lr_frac
        if momentum_schedule not in (*MOMENTUM_SCHEDULES, None):
            raise ValueError(f"momentum_schedule={momentum_schedule!r}: use one of {MOMENTUM_SCHEDULES} or None")
        self.momentum_schedule = momentum_schedule
        self.weight_decay_schedule = weight_decay_schedule
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        mult = lr_multiplier(step, self.total_steps, self.warmup_steps, self.warmdown_ratio, self.final_lr_frac)
        for group in self.optimizer.param_groups:
            if group["kind"] != "muon":
                continue
            if self.momentum_schedule == "pretrain":
                group["momentum"] = muon_momentum(step, self.total_steps, self.warmdown_ratio)
            elif self.momentum_schedule == "warmup":
                group["momentum"] = warmup_muon_momentum(step)
            if self.weight_decay_schedule:
                group["weight_decay"] = group["initial_weight_decay"] * weight_decay_multiplier(step, self.total_steps)
        return [group["initial_lr"] * mult for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        # Construction applied step 0's values to the optimizer; re-apply those of the restored step.
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
